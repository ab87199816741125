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
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from inflight.v1 import common_pb2
from scheduler.block_allocator import BlockAllocator
from scheduler.kv_events import KvEventLog
from scheduler.kv_manager import KvManager
from scheduler.policy import Policy, WaitingQueue
from inflight.step_contract import PREVIOUS_TOKEN
from scheduler.request import Request, RequestKey, RequestStatus


@dataclass(frozen=True)
class PlannerLimits:
    max_num_batched_tokens: int
    max_num_seqs: int
    max_model_len: int
    block_size: int
    num_kv_blocks: int


@dataclass(slots=True)
class Chunk:
    request: Request
    token_ids: list[int]
    num_computed_tokens: int
    new_block_ids: list[int]
    sample: bool
    output_index: int = -1   # where its sampled token goes in request.output_token_ids (sample only)
    preemptions: int = 0     # request.num_preemptions when planned: a chunk of an earlier life is stale


@dataclass
class PlannedStep:
    step_id: int
    released_slot_ids: list[int]
    admitted: list[Request]
    chunks: list[Chunk]
    short_of_blocks: bool = False  # a running request was left out: making room for it needs a preemption

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)


@dataclass(slots=True)
class RequestOutput:
    request: Request
    new_token_ids: list[int]
    finish_reason: int  # FINISH_REASON_UNSPECIFIED while the request runs on
    slot_id: int        # the slot the token was sampled in (the request may have released it since)
    first: bool = False  # the request's first output token


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
        self.running: list[Request] = []
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
        budget = self.limits.max_num_batched_tokens
        chunks: list[Chunk] = []
        admitted: list[Request] = []
        preemptions_before = self.stats.preemptions_total
        short_of_blocks = False
        for request in sorted(self.running, key=self.policy.key):
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING or self._planned_to_end(request):
                continue  # preempted earlier in this loop, or its last token is planned
            num_tokens = min(request.num_uncomputed_tokens, budget)
            if in_flight and not self.kv.can_allocate(request, num_tokens):
                short_of_blocks = True
            elif self._make_room(request, num_tokens, chunks):
                chunks.append(self._chunk(request, num_tokens))
                budget -= num_tokens
        # After a preemption the cache is full: admitting now would only thrash.
        if self.stats.preemptions_total == preemptions_before and not short_of_blocks:
            while budget > 0 and self._free_slots:
                request = self.waiting.peek()
                if request is None:
                    break
                hits = self.kv.cached_prefix(request)
                num_tokens = min(request.num_tokens - len(hits) * self.limits.block_size, budget)
                if not self.kv.can_admit(request, hits, num_tokens):
                    break
                self._admit(self.waiting.pop(), hits)
                admitted.append(request)
                chunks.append(self._chunk(request, num_tokens))
                budget -= num_tokens
        step = self._planned(admitted, chunks)
        step.short_of_blocks = short_of_blocks
        return step

    def _planned_to_end(self, request: Request) -> bool:
        """Its planned outputs already reach max_new_tokens or the context length."""
        return (len(request.output_token_ids) >= request.max_new_tokens
                or request.num_tokens >= self.limits.max_model_len)

    def _make_room(self, request: Request, num_tokens: int, scheduled: list[Chunk]) -> bool:
        """Preempt until request's next tokens fit; False if request itself had to go."""
        while not self.kv.can_allocate(request, num_tokens):
            scheduled_ids = {id(c.request) for c in scheduled}
            candidates = [r for r in self.running if id(r) not in scheduled_ids]
            victim = max(candidates, key=self.policy.key)
            self._preempt(victim)
            if victim is request:
                return False
        return True

    def _chunk(self, request: Request, num_tokens: int) -> Chunk:
        start = request.num_computed_tokens
        self.kv.allocate(request, num_tokens)
        chunk = Chunk(
            request=request,
            token_ids=request.token_ids(start, start + num_tokens),
            num_computed_tokens=start,
            new_block_ids=request.new_block_ids(),
            sample=start + num_tokens == request.num_tokens,
            preemptions=request.num_preemptions,
        )
        request.num_computed_tokens += num_tokens
        if chunk.sample:
            chunk.output_index = len(request.output_token_ids)
            request.output_token_ids.append(PREVIOUS_TOKEN)
        return chunk

    def _planned(self, admitted: list[Request], chunks: list[Chunk]) -> PlannedStep:
        if not chunks:  # not sent: its releases wait for the next step that is
            return PlannedStep(self._next_step_id, [], admitted, chunks)
        step = PlannedStep(self._next_step_id, self._released_slots, admitted, chunks)
        self._released_slots = []
        self._next_step_id += 1
        self.stats.steps_total += 1
        self.stats.batched_sequences_total += len(chunks)
        self.stats.max_batch_size_seen = max(self.stats.max_batch_size_seen, len(chunks))
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
        request.slot_id = self._free_slots.pop()
        self.running.append(request)

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
            self._released_slots.append(request.slot_id)
            self._free_slots.append(request.slot_id)
            request.slot_id = None
        if request in self.running:
            self.running.remove(request)

    def _finish(self, request: Request, reason: int) -> None:
        outputs = request.output_token_ids
        while outputs and outputs[-1] == PREVIOUS_TOKEN:  # planned past its end: never sampled, never shown
            outputs.pop()
        self._release(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        del self.requests[request.key]

    # --- results -----------------------------------------------------------------------

    def update(self, step: PlannedStep, sampled: dict[int, int]) -> list[RequestOutput]:
        """Apply a step's result (slot id -> sampled token); returns what each request produced.

        Steps are applied in the order they were planned.
        """
        outputs = []
        block_size = self.limits.block_size
        for chunk in step.chunks:
            request = chunk.request
            if request.status is not RequestStatus.RUNNING or chunk.preemptions != request.num_preemptions:
                continue  # finished (aborted, or ended by the step before) or preempted since it was planned
            request.num_confirmed_tokens = confirmed = chunk.num_computed_tokens + len(chunk.token_ids)
            if confirmed // block_size > request.num_indexed_blocks:  # a block was filled: index it
                self.kv.cache_full_blocks(request)
            if not chunk.sample:
                continue
            slot = request.slot_id
            token = sampled[slot]  # type: ignore[index]
            index = chunk.output_index
            request.output_token_ids[index] = token
            self.stats.generated_tokens_total += 1
            reason = self._finish_reason(request, token, index + 1)
            if reason:
                self._finish(request, reason)
            outputs.append(RequestOutput(request, [token], reason, slot, first=index == 0))
        return outputs

    def _finish_reason(self, request: Request, token: int, num_outputs: int) -> int:
        if token in request.stop_token_ids:
            return common_pb2.FINISH_REASON_STOP
        if num_outputs >= request.max_new_tokens or len(request.prompt_token_ids) + num_outputs >= self.limits.max_model_len:
            return common_pb2.FINISH_REASON_LENGTH
        return common_pb2.FINISH_REASON_UNSPECIFIED

    def check_invariants(self) -> None:
        self.allocator.check_invariants([r.block_ids for r in self.running])
        slots = [r.slot_id for r in self.running]
        assert None not in slots and len(set(slots)) == len(slots), "running requests share a slot"
        assert len(self._free_slots) + len(slots) == self.limits.max_num_seqs, "a slot leaked"
        for request in self.running:
            assert len(request.block_ids) * self.limits.block_size >= request.num_computed_tokens
            assert request.num_confirmed_tokens <= request.num_computed_tokens
