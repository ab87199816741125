"""The batch planner: which sequences run in the next step, and how many tokens each.

One token budget per step is shared by decodes and prompt chunks: running sequences
first (in policy order), then waiting ones, the last prompt chunked to fit. KV blocks are
allocated optimistically; when they run out, the running request that sorts last under
the policy is preempted (its blocks freed, recomputed later from its tokens).
All state changes happen in plain synchronous methods called by one owner.

Overlap scheduling plans step N+1 while step N runs. A request's tokens are then counted as
computed when they are planned (num_computed_tokens), confirmed when their step returns
(num_confirmed_tokens, what the prefix cache indexes), and a token step N samples is planned
as PREVIOUS_TOKEN until step N's result replaces it. A request that step N finishes has its
planned token in step N+1 dropped. Preemption waits for a step with nothing in flight: a
planning pass that would need one leaves the request out and says so (short_of_blocks).

The usual step (every running request's next tokens fit the budget and the free blocks) is planned in
bulk over SlotColumns, and a result is applied in bulk: a decode costs a few array entries and one
list append, not a pass through the request. A step where the budget or the blocks fall short is
planned one request at a time, in policy order, so that the policy decides who waits or is preempted;
when everything fits, both passes plan the same sequences (tests/test_planner.py holds them to it).
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from inflight.v1 import common_pb2
from scheduler.block_allocator import BlockAllocator
from scheduler.kv_events import KvEventLog
from scheduler.kv_manager import KvManager
from scheduler.planned_step import Decodes, PlannedStep, StepBuilder, StepOutputs
from scheduler.policy import Policy, WaitingQueue
from inflight.step_contract import PREVIOUS_TOKEN
from scheduler.request import Request, RequestKey, RequestStatus
from scheduler.slot_columns import SlotColumns


@dataclass(frozen=True)
class PlannerLimits:
    max_num_batched_tokens: int
    max_num_seqs: int
    max_model_len: int
    block_size: int
    num_kv_blocks: int


@dataclass
class PlannerStats:
    steps_total: int = 0
    preemptions_total: int = 0
    prompt_tokens_total: int = 0
    generated_tokens_total: int = 0
    max_batch_size_seen: int = 0
    batched_sequences_total: int = 0
    prefix_cache_hit_tokens_total: int = 0


@dataclass
class BatchPlanner:
    limits: PlannerLimits
    policy: Policy
    enable_prefix_caching: bool = True
    events: KvEventLog | None = None  # told what the prefix cache stores and drops
    allocator: BlockAllocator = field(init=False)
    kv: KvManager = field(init=False)

    def __post_init__(self) -> None:
        self.allocator = BlockAllocator(self.limits.num_kv_blocks, self.events.removed if self.events else None)
        self.kv = KvManager(self.allocator, self.limits.block_size, self.enable_prefix_caching, self.events)
        self.waiting = WaitingQueue(self.policy)
        self.running: list[Request] = []  # in policy order (a request's key never changes)
        self.columns = SlotColumns(self.limits.max_num_seqs)
        self._running_slots: np.ndarray | None = None  # slots of self.running, in its order (None: to be read)
        self._sampled_scratch = np.zeros(self.limits.max_num_seqs, dtype=np.int64)
        self.requests: dict[RequestKey, Request] = {}
        self.stats = PlannerStats()
        self._free_slots = list(range(self.limits.max_num_seqs - 1, -1, -1))
        self._released_slots: list[int] = []
        self._next_step_id = 1

    # --- requests in and out -------------------------------------------------------------

    def blocks_needed_alone(self, num_prompt_tokens: int, max_new_tokens: int) -> int:
        total = min(num_prompt_tokens + max_new_tokens, self.limits.max_model_len)
        return -(-total // self.limits.block_size)

    def add(self, request: Request) -> None:
        request.max_num_tokens = min(request.num_prompt_tokens + request.max_new_tokens, self.limits.max_model_len)
        self.requests[request.key] = request
        self.stats.prompt_tokens_total += len(request.prompt_token_ids)
        self.policy.on_arrival(request)
        self.waiting.push(request)

    def abort(self, key: RequestKey) -> Request | None:
        """Finish a request now and free its blocks; safe while its step is in flight."""
        request = self.requests.get(key)
        if request is None or request.status is RequestStatus.FINISHED:
            return None
        if request.status is RequestStatus.WAITING:
            self.waiting.discard(request)
        self._finish(request, common_pb2.FINISH_REASON_ABORT)
        return request

    def abort_all(self) -> list[Request]:
        return [r for r in list(self.requests.values()) if self.abort(r.key)]

    def has_work(self) -> bool:
        return bool(self.running) or len(self.waiting) > 0

    # --- planning ----------------------------------------------------------------------

    def schedule(self, in_flight: bool = False) -> PlannedStep:
        """The next step. in_flight: a step is still running (overlap), so nothing may be preempted."""
        plan = StepBuilder()
        budget = self.limits.max_num_batched_tokens
        preemptions_before = self.stats.preemptions_total
        if self.running:
            left = self._plan_running_in_bulk(plan, budget)
            budget = self._plan_running_one_by_one(plan, budget, in_flight) if left is None else left
        # After a preemption the cache is full: admitting now would only thrash.
        if self.stats.preemptions_total == preemptions_before and not plan.short_of_blocks:
            while budget > 0 and self._free_slots:
                request = self.waiting.peek()
                if request is None:
                    break
                hits = self.kv.cached_prefix(request)
                num_tokens = min(request.num_tokens - len(hits) * self.limits.block_size, budget)
                if not self.kv.can_admit(request, hits, num_tokens):
                    break
                self._admit(self.waiting.pop(), hits)
                plan.admitted.append(request)
                self._add_chunk(plan, request, num_tokens)
                budget -= num_tokens
        return self._planned(plan)

    def _plan_running_in_bulk(self, plan: StepBuilder, budget: int) -> int | None:
        """Every running request's next tokens, when all of them fit the budget and the free blocks (then the
        policy order changes nothing); returns the budget left, or None when they do not all fit."""
        columns, block_size = self.columns, self.limits.block_size
        slots = self._slots_in_policy_order()
        computed = columns.num_computed[slots]
        num_tokens = columns.num_tokens[slots]
        cost = num_tokens - computed
        cost[num_tokens >= columns.max_num_tokens[slots]] = 0  # its last token is planned
        total = int(cost.sum())
        if total > budget:
            return None
        blocks_needed = np.maximum(0, -(-(computed + cost) // block_size) - columns.num_blocks[slots])
        if int(blocks_needed.sum()) > self.allocator.num_free:
            return None
        decode = cost == 1
        if decode.all():  # the usual step: every running request decodes
            plan.decodes = self._decodes(list(self.running), slots, computed, blocks_needed > 0)
            return budget - total
        for row in np.flatnonzero(cost > 1).tolist():  # prompt chunks (a long prompt, a recompute): few
            self._add_chunk(plan, self.running[row], int(cost[row]))
        rows = np.flatnonzero(decode)
        if rows.size:
            plan.decodes = self._decodes([self.running[i] for i in rows.tolist()], slots[rows], computed[rows],
                                         blocks_needed[rows] > 0)
        return budget - total

    def _decodes(self, requests: list[Request], slots: np.ndarray, positions: np.ndarray, grows: np.ndarray) -> Decodes:
        """Running requests whose next token is their last one, each adding at most one block (grows), planned."""
        columns = self.columns
        new_block_ids = []
        for row in np.flatnonzero(grows).tolist():  # one in block_size decodes
            request = requests[row]
            block = self.allocator.allocate_one()
            request.block_ids.append(block)
            request.num_blocks_on_worker += 1
            new_block_ids.append(block)
        columns.num_blocks[slots[grows]] += 1
        tokens = columns.last_token[slots]
        columns.num_computed[slots] = positions + 1
        columns.num_tokens[slots] += 1
        columns.last_token[slots] = PREVIOUS_TOKEN
        for request in requests:
            request.output_token_ids.append(PREVIOUS_TOKEN)
        return Decodes(requests, slots, positions, tokens, grows, new_block_ids)

    def _plan_running_one_by_one(self, plan: StepBuilder, budget: int, in_flight: bool) -> int:
        """Running requests in policy order while the budget lasts, preempting the last ones (or, with a step in
        flight, leaving a request out) when blocks run short; returns the budget left."""
        for request in tuple(self.running):
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING or request.num_tokens >= request.max_num_tokens:
                continue  # preempted earlier in this loop, or its last token is planned
            num_tokens = min(request.num_uncomputed_tokens, budget)
            if in_flight and not self.kv.can_allocate(request, num_tokens):
                plan.short_of_blocks = True
            elif self._make_room(request, num_tokens, plan):
                self._add_chunk(plan, request, num_tokens)
                budget -= num_tokens
        return budget

    def _slots_in_policy_order(self) -> np.ndarray:
        if self._running_slots is None:
            self._running_slots = np.array([r.slot_id for r in self.running], dtype=np.int64)
        return self._running_slots

    def _make_room(self, request: Request, num_tokens: int, plan: StepBuilder) -> bool:
        """Preempt until request's next tokens fit; False if request itself had to go."""
        while not self.kv.can_allocate(request, num_tokens):
            scheduled_ids = {id(r) for r in plan.requests}
            candidates = [r for r in self.running if id(r) not in scheduled_ids]
            victim = max(candidates, key=self.policy.key)
            self._preempt(victim)
            if victim is request:
                return False
        return True

    def _add_chunk(self, plan: StepBuilder, request: Request, num_tokens: int) -> None:
        """A sequence's next num_tokens tokens into the plan."""
        start = request.num_computed_tokens
        self.kv.allocate(request, num_tokens)
        new_blocks = request.new_block_ids()
        slot = request.slot_id
        assert slot is not None
        self.columns.num_blocks[slot] = len(request.block_ids)
        plan.add(request, slot, start, request.token_ids(start, start + num_tokens), new_blocks)
        request.num_computed_tokens += num_tokens
        sample = request.num_computed_tokens == request.num_tokens  # it reaches its end: the step samples the next
        plan.sample.append(sample)
        if sample:
            request.output_token_ids.append(PREVIOUS_TOKEN)
            self.columns.num_tokens[slot] += 1
            self.columns.last_token[slot] = PREVIOUS_TOKEN

    def _planned(self, plan: StepBuilder) -> PlannedStep:
        step = plan.build(self._next_step_id)
        if not step.requests:  # not sent: its releases wait for the next step that is
            return step
        step.leases = self.columns.lease[step.slot_ids]
        step.released_slot_ids = self._released_slots
        self._released_slots = []
        self._next_step_id += 1
        self.stats.steps_total += 1
        self.stats.batched_sequences_total += len(step.requests)
        self.stats.max_batch_size_seen = max(self.stats.max_batch_size_seen, len(step.requests))
        return step

    def _admit(self, request: Request, hits: list[int]) -> None:
        self.kv.admit(request, hits)
        hit_tokens = request.num_computed_tokens
        self.stats.prefix_cache_hit_tokens_total += hit_tokens
        if not request.output_token_ids and not request.num_preemptions:
            request.num_cached_prompt_tokens = hit_tokens
            request.first_scheduled_at = time.monotonic()
        self.policy.on_admit(request)
        request.status = RequestStatus.RUNNING
        self.columns.hold(self._free_slots.pop(), request)
        bisect.insort(self.running, request, key=self.policy.key)
        self._running_slots = None

    def _preempt(self, request: Request) -> None:
        self._release(request)
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = request.num_confirmed_tokens = 0
        request.num_preemptions += 1
        self.stats.preemptions_total += 1
        self.waiting.push(request)

    def _release(self, request: Request) -> None:
        """Give back a running request's blocks and slot."""
        self.kv.free(request)
        if request.slot_id is not None:
            slot = self.columns.release(request)
            self._released_slots.append(slot)
            self._free_slots.append(slot)
        if request in self.running:
            self.running.remove(request)
            self._running_slots = None

    def _finish(self, request: Request, reason: int) -> None:
        outputs = request.output_token_ids
        while outputs and outputs[-1] == PREVIOUS_TOKEN:  # planned past its end: never sampled, never shown
            outputs.pop()
        self._release(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        del self.requests[request.key]

    # --- results -----------------------------------------------------------------------

    def update(self, step: PlannedStep, slot_ids: Sequence[int], token_ids: Sequence[int]) -> StepOutputs:
        """Apply a step's result (the token each sampled slot drew); returns what each request produced.

        Steps are applied in the order they were planned. A sequence whose request has let its slot go since
        (it finished, was aborted, or was preempted) is skipped.
        """
        out = StepOutputs()
        if not step.requests:
            return out
        columns, block_size = self.columns, self.limits.block_size
        slots = step.slot_ids
        live = columns.lease[slots] == step.leases
        starts = step.num_computed_tokens
        ends = starts + step.num_tokens
        columns.num_confirmed[slots[live]] = ends[live]
        if self.kv.enable_prefix_caching:  # a sequence that filled a block: index it for the prefix cache
            filled = np.flatnonzero(live & (ends // block_size > starts // block_size))
            self.kv.cache_full_blocks([step.requests[row] for row in filled.tolist()], ends[filled].tolist())
        sampled = live & step.sample
        if sampled.all():  # the usual step: every sequence samples, none has gone
            requests = step.requests
        else:
            rows = np.flatnonzero(sampled)
            if not rows.size:
                return out
            slots, ends = slots[rows], ends[rows]
            requests = [step.requests[i] for i in rows.tolist()]
        tokens = self._tokens_of(slots, slot_ids, token_ids)
        indexes = ends - columns.num_prompt_tokens[slots]  # each token's place in its output_token_ids
        newest = ends + 1 == columns.num_tokens[slots]     # not planned past yet
        columns.last_token[slots[newest]] = tokens[newest]
        token_list = tokens.tolist()
        for request, index, token in zip(requests, indexes.tolist(), token_list):
            request.output_token_ids[index] = token
        stopped = (columns.stop_ids[slots] == tokens[:, None]).any(axis=1)
        ended = stopped | (ends + 1 >= columns.max_num_tokens[slots])
        reasons = [common_pb2.FINISH_REASON_UNSPECIFIED] * len(token_list)
        for row in np.flatnonzero(ended).tolist():
            reasons[row] = common_pb2.FINISH_REASON_STOP if stopped[row] else common_pb2.FINISH_REASON_LENGTH
            self._finish(requests[row], reasons[row])
        self.stats.generated_tokens_total += len(token_list)
        return StepOutputs(requests, token_list, slots.tolist(), reasons, (indexes == 0).tolist())

    def _tokens_of(self, slots: np.ndarray, slot_ids: Sequence[int], token_ids: Sequence[int]) -> np.ndarray:
        """The tokens sampled in slots, out of the result's (slot, token) columns."""
        result_slots, result_tokens = np.asarray(slot_ids, dtype=np.int64), np.asarray(token_ids, dtype=np.int64)
        if len(result_slots) == len(slots) and (result_slots == slots).all():
            return result_tokens  # in the step's order (a decode step, as the worker lays it out)
        scratch = self._sampled_scratch
        scratch[slots] = -1
        scratch[result_slots] = result_tokens
        tokens = scratch[slots]
        if (tokens < 0).any():
            missing = slots[tokens < 0].tolist()
            raise ValueError(f"the result has no token for sampled slots {missing}")
        return tokens

    def check_invariants(self) -> None:
        self.allocator.check_invariants([r.block_ids for r in self.running])
        slots = [r.slot_id for r in self.running]
        assert None not in slots and len(set(slots)) == len(slots), "running requests share a slot"
        assert len(self._free_slots) + len(slots) == self.limits.max_num_seqs, "a slot leaked"
        for request in self.running:
            assert len(request.block_ids) * self.limits.block_size >= request.num_computed_tokens
            assert request.num_confirmed_tokens <= request.num_computed_tokens
            self.columns.check(request)
        assert self._running_slots is None or self._running_slots.tolist() == slots, "the slot order is stale"

