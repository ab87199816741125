"""The scheduler's one owner of state: plans a step, sends it, applies the result, repeats.

Every mutation of the planner happens in this module's synchronous code; the only awaits
are the worker stream's writes and reads. Aborts that land during them free their blocks at
once and their results are dropped when the step returns.

Overlap scheduling (--overlap; by default on unless the worker computes on CPU): two steps
(--steps-in-flight) are in flight on the worker stream. The loop plans and sends step N+1, then
waits for step N's result, so the worker starts N+1 the moment N ends while the loop reads N's
tokens and plans N+2 (scheduler/planner.py says how a token not sampled yet is planned).

Failures are contained at the smallest scope that holds them: a sequence's own error fails
that request; a failed step fails the step's requests; a lost or hung worker group fails the
requests in flight, and the loop connects to the group's replacement. The loop itself never
ends while the process runs.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import grpc
import structlog

from inflight.connection import KeepalivePolicy
from inflight.sampling import out_of_range
from inflight.v1 import common_pb2, scheduler_pb2, worker_pb2
from scheduler.config import SchedulerConfig
from scheduler.kv_events import KvEventLog, restart_safe_first_sequence
from scheduler.planned_step import PlannedStep, StepOutputs
from scheduler.planner import BatchPlanner, PlannerLimits, PlannerStats
from scheduler.policy import make_policy
from scheduler.request import Request, RequestKey
from scheduler.worker_link import StepTimedOut, WorkerLink, WorkerUnavailable, plan_to_proto

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from scheduler.tracing import SchedulerTracing

log = structlog.get_logger()


@dataclass(frozen=True)
class Failure:
    """Ends a request's stream with a gRPC status."""

    code: grpc.StatusCode
    message: str


class RequestRejected(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class FailureCounters:
    worker_restarts: int = 0  # connections to a new worker group after losing one
    step_timeouts: int = 0
    failed_requests: int = 0


StreamItem = scheduler_pb2.TokenEvent | Failure


class EventSink(Protocol):
    """Where a request's events go: its Submit call's queue, or its session's outbox."""

    def put_nowait(self, item: StreamItem) -> None: ...


@dataclass
class SentStep:
    """A step on the worker stream whose result has not come back."""

    step: PlannedStep
    plan: worker_pb2.StepPlan
    by_slot: dict[int, Request]  # slots change once the step is back
    span: Span | None = None


class EngineLoop:
    def __init__(self, config: SchedulerConfig, on_ready_change: Callable[[bool], None],
                 tracing: SchedulerTracing | None = None) -> None:
        self.config = config
        self.tracing = tracing  # None: not traced
        self.link = WorkerLink(config.worker, KeepalivePolicy(config.keepalive_seconds))
        self.planner: BatchPlanner | None = None
        self.description: worker_pb2.WorkerDescription | None = None
        self.streams: dict[RequestKey, EventSink] = {}
        self.counters = FailureCounters()
        # Across worker groups: one sequence per process, numbered above any predecessor's.
        self.kv_events = KvEventLog(config.kv_event_history, restart_safe_first_sequence())
        self._planner_stats = PlannerStats()  # kept across worker groups, so counters never go back
        self._on_ready_change = on_ready_change
        self._wake = asyncio.Event()
        self._arrivals = 0
        self._connections = 0

    @property
    def ready(self) -> bool:
        return self.planner is not None

    # --- called by the gRPC service ------------------------------------------------------

    def submit(self, submit: scheduler_pb2.SubmitRequest, sink: EventSink) -> None:
        """Queue a request; its events go to sink. Raises RequestRejected (nothing queued)."""
        planner, description = self.planner, self.description
        if planner is None or description is None:
            raise RequestRejected(grpc.StatusCode.UNAVAILABLE, "the worker group is not ready")
        request = self._make_request(submit, planner, description)
        self.streams[request.key] = sink
        planner.add(request)
        self._report_load(planner)  # a router hears of the new prompt now, not after the step in flight
        if self.tracing is not None:
            self.tracing.queued(request)
        log.info("request_queued", request_id=request.request_id, tenant=request.tenant,
                 prompt_tokens=len(request.prompt_token_ids), max_new_tokens=request.max_new_tokens)
        self._wake.set()

    def abort(self, key: RequestKey) -> bool:
        planner = self.planner
        request = planner.abort(key) if planner else None
        queue = self.streams.pop(key, None)
        if queue is not None:
            queue.put_nowait(scheduler_pb2.TokenEvent(finish_reason=common_pb2.FINISH_REASON_ABORT))
        if planner is not None and request is not None:
            self._report_load(planner)
            log.info("request_aborted", request_id=request.request_id, generated=len(request.output_token_ids))
            if self.tracing is not None:
                self.tracing.finished(request, common_pb2.FINISH_REASON_ABORT)
        return request is not None

    def requests_held(self) -> int:
        """Requests running or waiting: what the queue bound (max_num_seqs + max_waiting_requests) counts."""
        planner = self.planner
        return 0 if planner is None else len(planner.waiting) + len(planner.running)

    def stats(self) -> common_pb2.Stats:
        planner = self.planner
        if planner is None:
            raise RequestRejected(grpc.StatusCode.UNAVAILABLE, "the worker group is not ready")
        s, c = planner.stats, self.counters
        return common_pb2.Stats(
            kv_blocks_total=planner.allocator.num_usable,
            kv_blocks_free=planner.allocator.num_free,
            kv_blocks_cached=planner.allocator.num_cached,
            requests_running=len(planner.running),
            requests_waiting=len(planner.waiting),
            steps_total=s.steps_total,
            preemptions_total=s.preemptions_total,
            prompt_tokens_total=s.prompt_tokens_total,
            generated_tokens_total=s.generated_tokens_total,
            max_batch_size_seen=s.max_batch_size_seen,
            batched_sequences_total=s.batched_sequences_total,
            prefix_cache_hit_tokens_total=s.prefix_cache_hit_tokens_total,
            worker_restarts=c.worker_restarts,
            step_timeouts=c.step_timeouts,
            failed_requests_total=c.failed_requests,
        )

    def _make_request(self, submit: scheduler_pb2.SubmitRequest, planner: BatchPlanner,
                      description: worker_pb2.WorkerDescription) -> Request:
        prompt = list(submit.prompt_token_ids)
        limits = planner.limits
        if not submit.request_id:
            raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, "request_id: must not be empty")
        capacity = self.config.max_waiting_requests + limits.max_num_seqs
        if self.requests_held() >= capacity:
            raise RequestRejected(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  f"the queue is full ({capacity} requests running or waiting)")
        if (submit.tenant, submit.request_id) in self.streams:
            raise RequestRejected(grpc.StatusCode.ALREADY_EXISTS, f"request_id: {submit.request_id!r} is in flight")
        if not prompt:
            raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, "prompt_token_ids: must not be empty")
        if max(prompt) >= description.vocab_size:
            raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"prompt_token_ids: ids must be below the vocabulary size {description.vocab_size}")
        if len(prompt) >= limits.max_model_len:
            raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"prompt_token_ids: {len(prompt)} tokens leave no room in the context length {limits.max_model_len}")
        if submit.max_new_tokens == 0:
            raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens: must be at least 1")
        problem = out_of_range(submit.sampling)  # every field as sent: the gateway resolved them
        if problem is not None:
            raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, "sampling.{}: {}".format(*problem))
        max_new_tokens = min(submit.max_new_tokens, limits.max_model_len - len(prompt))
        if planner.blocks_needed_alone(len(prompt), max_new_tokens) > planner.allocator.num_usable:
            raise RequestRejected(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  f"the request needs more KV blocks than the whole cache holds ({planner.allocator.num_usable})")
        sampling = common_pb2.SamplingParams()
        sampling.CopyFrom(submit.sampling)
        if not sampling.HasField("seed"):
            sampling.seed = random.getrandbits(63)
        stop = set(submit.stop_token_ids)
        if not submit.ignore_eos:
            stop |= set(description.eos_token_ids)
        self._arrivals += 1
        return Request(
            request_id=submit.request_id, prompt_token_ids=prompt, max_new_tokens=max_new_tokens,
            sampling=sampling, stop_token_ids=frozenset(stop), arrival_order=self._arrivals,
            priority=submit.priority, tenant=submit.tenant, cache_salt=submit.cache_salt, arrived_at=time.monotonic(),
            logprobs=submit.logprobs or submit.sampling.top_logprobs > 0,
        )

    # --- the loop ----------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            await self._connect()
            try:
                await self._serve_steps()
            except StepTimedOut as error:
                self.counters.step_timeouts += 1
                log.error("step_timed_out", error=str(error))
            except WorkerUnavailable as error:
                log.error("worker_lost", error=str(error))
            except Exception:  # a bug here must not take the scheduler down: start over on a fresh planner
                log.exception("engine_loop_failed")
            self._fail_all()
            await self.link.close()

    async def _connect(self) -> None:
        while True:
            try:
                description, warmup = await self.link.connect(self.config.connect_timeout)
                break
            except WorkerUnavailable as error:
                log.warning("worker_unreachable", error=str(error))
                await asyncio.sleep(0.5)
        limits = PlannerLimits(
            max_num_batched_tokens=min(self.config.max_num_batched_tokens or description.max_num_batched_tokens,
                                       description.max_num_batched_tokens),
            max_num_seqs=min(self.config.max_num_seqs or description.max_num_seqs, description.max_num_seqs),
            max_model_len=description.max_model_len,
            block_size=description.block_size,
            num_kv_blocks=min(description.num_kv_blocks, warmup.num_kv_blocks or description.num_kv_blocks),
        )
        self.description = description
        planner = BatchPlanner(limits, make_policy(self.config.policy, self.config.tenant_weights),
                               enable_prefix_caching=description.prefix_caching and not self.config.no_prefix_caching,
                               events=self.kv_events)
        self.kv_events.cleared()  # a new worker group's cache starts empty
        self.kv_events.publish()
        planner.stats = self._planner_stats
        self.planner = planner
        self._connections += 1
        self.counters.worker_restarts = self._connections - 1
        log.info("worker_ready", model=description.model_name, tp_size=description.tp_size,
                 kv_blocks=limits.num_kv_blocks - 1, block_size=limits.block_size,
                 max_num_batched_tokens=limits.max_num_batched_tokens, max_num_seqs=limits.max_num_seqs,
                 warmup_seconds=round(warmup.warmup_seconds, 3), worker_restarts=self.counters.worker_restarts)
        self._on_ready_change(True)

    async def _serve_steps(self) -> None:
        planner = self.planner
        assert planner is not None
        assert self.description is not None
        depth = max(2, self.config.steps_in_flight) if self.config.overlaps(self.description.device) else 1
        in_flight: deque[SentStep] = deque()
        try:
            while True:
                sent = False
                # A pass short of blocks needs a preemption: the next one waits until nothing is in flight.
                if (planner.has_work() and len(in_flight) < depth
                        and not (in_flight and in_flight[-1].step.short_of_blocks)):
                    step = planner.schedule(in_flight=bool(in_flight))
                    if step.requests:
                        in_flight.append(await self._send(step))
                        sent = True
                        # Now that the worker has its next step, let handlers stream tokens and aborts arrive.
                        await asyncio.sleep(0)
                if in_flight and (len(in_flight) == depth or not sent):
                    oldest = in_flight[0]
                    result = await self.link.receive(oldest.plan)
                    in_flight.popleft()
                    self._apply(oldest, result)
                elif not in_flight and not sent:
                    if planner.has_work():
                        raise AssertionError("work is waiting but nothing could be scheduled")
                    planner.check_invariants()
                    self._report_load(planner)
                    self._wake.clear()
                    await self._wake.wait()
        finally:
            for lost in in_flight:
                if lost.span is not None and self.tracing is not None:
                    self.tracing.step_done(lost.span, None, "the worker stream was lost")

    def _report_load(self, planner: BatchPlanner) -> None:
        if self.kv_events.subscribers:  # computed only while a router listens
            self.kv_events.set_load(engine_load(planner))

    async def _send(self, step: PlannedStep) -> SentStep:
        sent = SentStep(step, plan_to_proto(step, self.config.step_bound(step.total_tokens)),
                        dict(zip(step.slot_ids.tolist(), step.requests)))
        if self.tracing is not None:
            self.tracing.scheduled(step)
            sent.span = self.tracing.step(step)
        await self.link.send(sent.plan)
        return sent

    def _apply(self, sent: SentStep, result: worker_pb2.StepResult) -> None:
        planner = self.planner
        assert planner is not None
        if sent.span is not None and self.tracing is not None:
            self.tracing.step_done(sent.span, result)
        if result.error:
            self._fail_step(sent.step, result.error)
            return
        self._fail_sequences(result.sequence_errors, sent.by_slot)
        sampled = result.sampled
        outputs = planner.update(sent.step, sampled.slot_ids, sampled.token_ids)
        self._deliver(outputs, sampled)
        self._report_load(planner)
        self.kv_events.publish()

    def _deliver(self, outputs: StepOutputs, sampled: worker_pb2.SampledTokens) -> None:
        logprobs: dict[int, common_pb2.TokenLogprob] | None = None  # built once, if a request asks
        for request, token, slot, reason, first in zip(outputs.requests, outputs.token_ids, outputs.slot_ids,
                                                       outputs.finish_reasons, outputs.first):
            queue = self.streams.get(request.key)
            if queue is None:
                continue
            event = scheduler_pb2.TokenEvent(token_ids=(token,), finish_reason=reason)
            if request.logprobs:
                if logprobs is None:
                    logprobs = logprobs_by_slot(sampled)
                event.logprobs.append(logprobs[slot])
            if first:
                event.num_cached_prompt_tokens = request.num_cached_prompt_tokens
                event.queue_seconds = max(0.0, request.first_scheduled_at - request.arrived_at)
                if self.tracing is not None:
                    self.tracing.first_token(request)
            queue.put_nowait(event)
            if reason:
                if self.tracing is not None:
                    self.tracing.finished(request, reason)
                del self.streams[request.key]
                log.info("request_finished", request_id=request.request_id,
                         reason=common_pb2.FinishReason.Name(reason),
                         generated=len(request.output_token_ids), preemptions=request.num_preemptions)

    def _fail(self, request: Request, code: grpc.StatusCode, message: str) -> None:
        """End one request with a status, freeing its blocks (a no-op if it already ended)."""
        if self.planner is None or self.planner.abort(request.key) is None:
            return
        self.counters.failed_requests += 1
        if self.tracing is not None:
            self.tracing.finished(request, common_pb2.FINISH_REASON_ABORT, failure=code)
        queue = self.streams.pop(request.key, None)
        if queue is not None:
            queue.put_nowait(Failure(code, message))

    def _fail_sequences(self, errors: list[worker_pb2.SequenceError], by_slot: dict[int, Request]) -> None:
        for error in errors:
            request = by_slot.get(error.slot_id)
            if request is None:
                continue
            code = grpc.StatusCode.INVALID_ARGUMENT if error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] \
                else grpc.StatusCode.INTERNAL
            log.error("sequence_failed", request_id=request.request_id, code=code.name, error=error.message)
            # Parameter errors are the client's to fix and carry no internals; anything else stays in the logs.
            message = f"request {request.request_id}: {error.message}" if code is grpc.StatusCode.INVALID_ARGUMENT \
                else _internal_error(request.request_id)
            self._fail(request, code, message)

    def _fail_step(self, step: PlannedStep, error: str) -> None:
        log.error("step_failed", step_id=step.step_id, error=error, request_ids=[r.request_id for r in step.requests])
        for request in step.requests:
            self._fail(request, grpc.StatusCode.INTERNAL, _internal_error(request.request_id))

    def _fail_all(self) -> None:
        """The worker group is gone: every request in flight ends UNAVAILABLE (safe to retry elsewhere)."""
        self._on_ready_change(False)
        planner, self.planner = self.planner, None
        for (_, request_id), queue in self.streams.items():
            queue.put_nowait(Failure(grpc.StatusCode.UNAVAILABLE, f"the worker group failed while serving request "
                                                                  f"{request_id}; it was not completed"))
        if planner is not None:
            self.counters.failed_requests += len(planner.requests)
            if self.tracing is not None:
                for request in planner.requests.values():
                    self.tracing.finished(request, common_pb2.FINISH_REASON_ABORT, failure=grpc.StatusCode.UNAVAILABLE)
        self.streams.clear()


def engine_load(planner: BatchPlanner) -> scheduler_pb2.EngineLoad:
    """What a router weighs besides the prefix cache: queue, pending prefill, KV blocks held."""
    waiting = list(planner.waiting)
    uncached = sum(len(r.prompt_token_ids) - r.num_computed_tokens for r in waiting)
    prefilling = sum(max(0, len(r.prompt_token_ids) - r.num_computed_tokens) for r in planner.running
                     if not r.output_token_ids)
    allocator, block_size = planner.allocator, planner.limits.block_size
    held = allocator.num_usable - allocator.num_free
    return scheduler_pb2.EngineLoad(
        running_requests=len(planner.running), waiting_requests=len(waiting),
        prefill_pending_tokens=uncached + prefilling, kv_usage=held / allocator.num_usable,
        max_running_requests=planner.limits.max_num_seqs, used_tokens=held * block_size,
        total_tokens=allocator.num_usable * block_size)


def logprobs_by_slot(sampled: worker_pb2.SampledTokens) -> dict[int, common_pb2.TokenLogprob]:
    """Each sampled slot's token with its log-probability and alternatives, out of the result's columns."""
    by_slot, top_at = {}, 0
    counts = sampled.num_top_logprobs or [0] * len(sampled.slot_ids)
    for slot, token, logprob, count in zip(sampled.slot_ids, sampled.token_ids, sampled.logprobs, counts):
        by_slot[slot] = common_pb2.TokenLogprob(token_id=token, logprob=logprob,
                                                top_token_ids=sampled.top_token_ids[top_at : top_at + count],
                                                top_logprobs=sampled.top_logprobs[top_at : top_at + count])
        top_at += count
    return by_slot


def _internal_error(request_id: str) -> str:
    return f"internal error while generating request {request_id}; the details are in the server logs"
