"""Policies order requests; they never touch budgets or blocks.

The waiting queue pops the request that sorts first; preemption takes the running
request that sorts last.
"""

from __future__ import annotations

import heapq
from typing import Protocol

from scheduler.request import Request, RequestStatus


class Policy(Protocol):
    def key(self, request: Request) -> tuple[int, ...]:
        """Smaller keys run first and are preempted last."""
        ...


class FcfsPolicy:
    """First come, first served; a preempted request keeps its place (its arrival order)."""

    def key(self, request: Request) -> tuple[int, ...]:
        return (request.arrival_order,)


class PriorityPolicy:
    """Higher priority first, then first come, first served."""

    def key(self, request: Request) -> tuple[int, ...]:
        return (-request.priority, request.arrival_order)


POLICIES: dict[str, type] = {"fcfs": FcfsPolicy, "priority": PriorityPolicy}


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
