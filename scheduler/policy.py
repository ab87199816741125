"""Policies order requests; they never touch budgets or blocks.

The waiting queue pops the request that sorts first; preemption takes the running
request that sorts last.
"""

from __future__ import annotations

import heapq
from typing import Protocol

from scheduler.request import Request, RequestStatus


class Policy(Protocol):
    def on_arrival(self, request: Request) -> None:
        """Called once when a request arrives, before it is queued."""
        ...

    def on_admit(self, request: Request) -> None:
        """Called when a request leaves the waiting queue to run."""
        ...

    def key(self, request: Request) -> tuple[float, ...]:
        """Smaller keys run first and are preempted last."""
        ...


class FcfsPolicy:
    """First come, first served; a preempted request keeps its place (its arrival order)."""

    def on_arrival(self, request: Request) -> None:
        pass

    def on_admit(self, request: Request) -> None:
        pass

    def key(self, request: Request) -> tuple[float, ...]:
        return (request.arrival_order,)


class PriorityPolicy:
    """Higher priority first, then first come, first served."""

    def on_arrival(self, request: Request) -> None:
        pass

    def on_admit(self, request: Request) -> None:
        pass

    def key(self, request: Request) -> tuple[float, ...]:
        return (-request.priority, request.arrival_order)


class FairSharePolicy:
    """Weighted fair sharing across tenants (start-time fair queueing over tokens).

    Each arrival gets a virtual finish tag: it starts when its tenant's previous request
    finished in virtual time (or now, if that is later) and lasts its token cost divided by the
    tenant's weight. A tenant that floods the queue only pushes its own tags forward.
    """

    def __init__(self, weights: dict[str, float] | None = None) -> None:
        self.weights = weights or {}
        self._last_tag: dict[str, float] = {}
        self._virtual_time = 0.0

    def on_arrival(self, request: Request) -> None:
        start = max(self._virtual_time, self._last_tag.get(request.tenant, 0.0))
        request.fair_tag = start + self._cost(request)
        self._last_tag[request.tenant] = request.fair_tag

    def _cost(self, request: Request) -> float:
        return (len(request.prompt_token_ids) + request.max_new_tokens) / self.weights.get(request.tenant, 1.0)

    def on_admit(self, request: Request) -> None:
        """Virtual time follows the start tag of the request that starts being served."""
        self._virtual_time = max(self._virtual_time, request.fair_tag - self._cost(request))

    def key(self, request: Request) -> tuple[float, ...]:
        return (request.fair_tag, request.arrival_order)


POLICIES = ("fcfs", "priority", "fair")


def parse_weights(text: str) -> dict[str, float]:
    """'teamA=2,teamB=0.5' -> {'teamA': 2.0, 'teamB': 0.5}"""
    weights = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        tenant, _, weight = item.partition("=")
        if not weight or float(weight) <= 0:
            raise ValueError(f"tenant weight {item!r}: use tenant=positive-number")
        weights[tenant] = float(weight)
    return weights


def make_policy(name: str, tenant_weights: str = "") -> Policy:
    if name == "fcfs":
        return FcfsPolicy()
    if name == "priority":
        return PriorityPolicy()
    if name == "fair":
        return FairSharePolicy(parse_weights(tenant_weights))
    raise ValueError(f"unknown policy {name!r}; use one of {POLICIES}")


class WaitingQueue:
    """Waiting requests in policy order; removal is lazy (a finished request is skipped)."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._heap: list[tuple[tuple[int, ...], int, Request]] = []
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def push(self, request: Request) -> None:
        heapq.heappush(self._heap, (self.policy.key(request), id(request), request))
        self._count += 1

    def _drop_stale(self) -> None:
        while self._heap and self._heap[0][2].status is not RequestStatus.WAITING:
            heapq.heappop(self._heap)

    def peek(self) -> Request | None:
        self._drop_stale()
        return self._heap[0][2] if self._heap else None

    def pop(self) -> Request:
        self._drop_stale()
        self._count -= 1
        return heapq.heappop(self._heap)[2]

    def discard(self, request: Request) -> None:
        """Called when a waiting request leaves the queue other than by pop (it is skipped later)."""
        self._count -= 1

    def __iter__(self):  # type: ignore[no-untyped-def]
        return (entry[2] for entry in self._heap if entry[2].status is RequestStatus.WAITING)
