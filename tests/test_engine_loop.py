"""The scheduler's engine loop when the worker misbehaves: each failure stays in its own scope.

The real EngineLoop and WorkerLink talk real gRPC to a scripted worker on a Unix socket, which
answers each step as the test says: a token per sampled sequence, a failed step, a failed
sequence, a broken stream, or no answer at all.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from inflight import sampling
from inflight.step_contract import PREVIOUS_TOKEN
from inflight.v1 import common_pb2, scheduler_pb2, worker_pb2, worker_pb2_grpc
from scheduler.config import SchedulerConfig
from scheduler.engine_loop import EngineLoop, Failure, RequestRejected

if TYPE_CHECKING:
    from scheduler.tracing import SchedulerTracing

DESCRIPTION = worker_pb2.WorkerDescription(
    model_name="scripted", vocab_size=100, eos_token_ids=[0], tp_size=1, block_size=4, num_kv_blocks=65,
    max_num_batched_tokens=64, max_num_seqs=8, max_model_len=128, device="cpu", dtype="float32", engine="scripted")
Answer = Callable[[worker_pb2.StepPlan, grpc.aio.ServicerContext], Awaitable[worker_pb2.StepResult | None]]


def token_at(position: int) -> int:
    """The scripted model: the token sampled at a position (never 0, the end-of-sequence id)."""
    return 1 + position % 97


@dataclass
class Row:
    """One scheduled sequence, out of the plan's columns."""

    slot_id: int
    num_computed_tokens: int
    token_ids: list[int]
    sample: bool


def rows(plan: worker_pb2.StepPlan) -> list[Row]:
    columns, out, at = plan.sequences, [], 0
    for slot, computed, count, sample in zip(columns.slot_ids, columns.num_computed_tokens, columns.num_tokens,
                                             columns.sample):
        out.append(Row(slot, computed, list(columns.token_ids[at : at + count]), sample))
        at += count
    return out


async def honest(plan: worker_pb2.StepPlan, context: grpc.aio.ServicerContext) -> worker_pb2.StepResult:
    sampled = [r for r in rows(plan) if r.sample]
    return worker_pb2.StepResult(step_id=plan.step_id, sampled=worker_pb2.SampledTokens(
        slot_ids=[r.slot_id for r in sampled],
        token_ids=[token_at(r.num_computed_tokens + len(r.token_ids)) for r in sampled],
        logprobs=[0.0] * len(sampled)))


class ScriptedWorker(worker_pb2_grpc.WorkerServicer):
    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.connections = 0
        self.plans: list[worker_pb2.StepPlan] = []

    async def Describe(self, request, context):  # type: ignore[no-untyped-def]
        return DESCRIPTION

    async def Warmup(self, request, context):  # type: ignore[no-untyped-def]
        self.connections += 1
        return worker_pb2.WarmupResponse(num_kv_blocks=DESCRIPTION.num_kv_blocks)

    async def Run(self, plans, context):  # type: ignore[no-untyped-def]
        async for plan in plans:
            self.plans.append(plan)
            result = await self.answer(plan, context)
            if result is None:
                return  # end the stream, as a worker that goes away between steps
            yield result


class Harness:
    def __init__(self, loop: EngineLoop, worker: ScriptedWorker) -> None:
        self.loop, self.worker = loop, worker

    def submit(self, request_id: str, max_new_tokens: int = 6, tenant: str = "") -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        self.loop.submit(scheduler_pb2.SubmitRequest(
            request_id=request_id, prompt_token_ids=[5, 6, 7, 8, 9], max_new_tokens=max_new_tokens,
            sampling=sampling.resolved(seed=1), tenant=tenant, ignore_eos=True), queue)
        return queue

    async def until_ready(self) -> None:
        for _ in range(200):
            if self.loop.ready:
                return
            await asyncio.sleep(0.02)
        raise TimeoutError("the engine loop never connected")

    def all_blocks_free(self) -> bool:
        planner = self.loop.planner
        return planner is not None and planner.allocator.num_free == planner.allocator.num_usable


async def outcome(queue: asyncio.Queue, timeout: float = 10.0) -> tuple[list[int], int | Failure]:
    """The tokens a request received, and how it ended: a finish reason or a Failure."""
    tokens: list[int] = []
    while True:
        item = await asyncio.wait_for(queue.get(), timeout)
        if isinstance(item, Failure):
            return tokens, item
        tokens += item.token_ids
        if item.finish_reason:
            return tokens, item.finish_reason


EXPECTED = [token_at(p) for p in range(5, 11)]  # six tokens after a five-token prompt


def run_with(answer: Answer, body: Callable[[Harness], Awaitable[None]], tmp_path: Path, step_timeout: float = 30.0,
             tracing: SchedulerTracing | None = None, overlap: bool = True) -> None:
    async def main() -> None:
        socket = f"unix://{tmp_path}/worker.sock"
        server = grpc.aio.server()
        worker = ScriptedWorker(answer)
        worker_pb2_grpc.add_WorkerServicer_to_server(worker, server)
        server.add_insecure_port(socket)
        await server.start()
        config = SchedulerConfig(worker=socket, listen="", max_num_batched_tokens=0, max_num_seqs=0, policy="fcfs",
                                 tenant_weights="", no_prefix_caching=False, connect_timeout=10.0,
                                 max_waiting_requests=64, step_timeout=step_timeout, step_timeout_per_token=0.0,
                                 keepalive_seconds=20.0, exit_with_parent=False, log_level="info",
                                 overlap="on" if overlap else "off")
        loop = EngineLoop(config, on_ready_change=lambda ready: None, tracing=tracing)
        runner = asyncio.create_task(loop.run())
        harness = Harness(loop, worker)
        try:
            await harness.until_ready()
            await body(harness)
        finally:
            runner.cancel()
            await loop.link.close()
            await server.stop(None)

    asyncio.run(main())


def test_a_failed_step_fails_only_its_requests_with_a_generic_message_and_the_loop_serves_on(tmp_path):
    async def answer(plan, context):  # type: ignore[no-untyped-def]
        if any(new.request_id == "doomed" for new in plan.new_sequences):
            return worker_pb2.StepResult(step_id=plan.step_id, error="RuntimeError: secret internals")
        return await honest(plan, context)

    async def body(h: Harness) -> None:
        tokens, ended = await outcome(h.submit("doomed"))
        assert isinstance(ended, Failure) and ended.code == grpc.StatusCode.INTERNAL
        assert "doomed" in ended.message and "secret" not in ended.message
        assert await outcome(h.submit("next")) == (EXPECTED, common_pb2.FINISH_REASON_LENGTH)
        assert h.worker.connections == 1 and h.loop.counters.failed_requests == 1
        assert h.all_blocks_free()

    run_with(answer, body, tmp_path)


def test_a_sequence_error_fails_that_request_alone_and_its_batch_mates_keep_their_tokens(tmp_path):
    async def answer(plan, context):  # type: ignore[no-untyped-def]
        result = await honest(plan, context)
        poisoned = {r.slot_id for r in rows(plan) if r.num_computed_tokens == 6}  # its second decode
        if len(plan.sequences.slot_ids) == 2 and poisoned:
            slot = min(poisoned)
            index = list(result.sampled.slot_ids).index(slot)
            for column in (result.sampled.slot_ids, result.sampled.token_ids, result.sampled.logprobs):
                del column[index]
            result.sequence_errors.add(slot_id=slot, code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
                                       message="its sampling parameters leave nothing to sample")
        return result

    async def body(h: Harness) -> None:
        first, second = h.submit("a"), h.submit("b")
        results = await asyncio.gather(outcome(first), outcome(second))
        failed = [r for r in results if isinstance(r[1], Failure)]
        assert len(failed) == 1 and failed[0][1].code == grpc.StatusCode.INVALID_ARGUMENT
        assert "leave nothing to sample" in failed[0][1].message
        assert [r for r in results if r not in failed] == [(EXPECTED, common_pb2.FINISH_REASON_LENGTH)]
        assert h.worker.connections == 1 and h.all_blocks_free()

    run_with(answer, body, tmp_path)


@pytest.mark.parametrize("how", ["aborted by the worker", "ended by the worker"])
def test_a_broken_stream_fails_requests_in_flight_unavailable_and_the_loop_reconnects(tmp_path, how):
    broken = asyncio.Event()

    async def answer(plan, context):  # type: ignore[no-untyped-def]
        if plan.sequences.slot_ids and plan.sequences.num_computed_tokens[0] == 7 and not broken.is_set():
            broken.set()
            if how == "aborted by the worker":
                await context.abort(grpc.StatusCode.UNAVAILABLE, "going away")
            return None
        return await honest(plan, context)

    async def body(h: Harness) -> None:
        tokens, ended = await outcome(h.submit("in-flight"))
        assert isinstance(ended, Failure) and ended.code == grpc.StatusCode.UNAVAILABLE
        assert tokens == EXPECTED[:3]  # three steps answered before the fourth broke
        await h.until_ready()
        assert await outcome(h.submit("after")) == (EXPECTED, common_pb2.FINISH_REASON_LENGTH)
        assert h.worker.connections == 2 and h.loop.counters.worker_restarts == 1
        assert h.all_blocks_free()

    run_with(answer, body, tmp_path)


def test_a_hung_step_is_given_up_after_its_bound_and_the_loop_reconnects(tmp_path):
    hung = asyncio.Event()

    async def answer(plan, context):  # type: ignore[no-untyped-def]
        if not hung.is_set():
            hung.set()
            await asyncio.sleep(3600)  # a frozen rank: no answer, no error
        return await honest(plan, context)

    async def body(h: Harness) -> None:
        started = asyncio.get_running_loop().time()
        tokens, ended = await outcome(h.submit("stuck"))
        waited = asyncio.get_running_loop().time() - started
        assert isinstance(ended, Failure) and ended.code == grpc.StatusCode.UNAVAILABLE and tokens == []
        assert 0.5 <= waited < 5.0
        assert h.worker.plans[0].timeout_seconds == pytest.approx(0.5)
        await h.until_ready()
        assert await outcome(h.submit("after")) == (EXPECTED, common_pb2.FINISH_REASON_LENGTH)
        assert h.loop.counters.step_timeouts == 1 and h.loop.counters.worker_restarts == 1

    run_with(answer, body, tmp_path, step_timeout=0.5)


def test_an_abort_during_a_step_frees_the_blocks_and_drops_the_result(tmp_path):
    in_step = asyncio.Event()

    async def answer(plan, context):  # type: ignore[no-untyped-def]
        in_step.set()
        await asyncio.sleep(0.2)
        return await honest(plan, context)

    async def body(h: Harness) -> None:
        queue = h.submit("cancelled", max_new_tokens=50)
        await in_step.wait()
        assert h.loop.abort(("", "cancelled"))
        assert h.all_blocks_free()
        assert await outcome(queue) == ([], common_pb2.FINISH_REASON_ABORT)
        await asyncio.sleep(0.4)  # the step comes back: its token must go nowhere
        assert queue.empty() and h.all_blocks_free()

    run_with(answer, body, tmp_path)


@pytest.mark.parametrize("overlap", [True, False])
def test_with_overlap_the_next_plan_is_sent_before_the_result_and_feeds_the_token_in_flight(tmp_path, overlap):
    """Plan N+1 is made before step N's result: it asks for step N's token by PREVIOUS_TOKEN. A request that
    ends at max_tokens gets no token past its end, and its blocks come back."""

    async def body(h: Harness) -> None:
        queues = [h.submit(f"r{i}", max_new_tokens=6) for i in range(3)]
        for queue in queues:
            assert await outcome(queue) == (EXPECTED, common_pb2.FINISH_REASON_LENGTH)
        for _ in range(50):
            if h.all_blocks_free():
                break
            await asyncio.sleep(0.02)
        assert h.all_blocks_free()
        fed = [r for plan in h.worker.plans for r in rows(plan) if r.token_ids == [PREVIOUS_TOKEN]]
        assert bool(fed) == overlap
        # Every request's sampled tokens: prompt then six outputs, never a seventh.
        assert max(r.num_computed_tokens for plan in h.worker.plans for r in rows(plan)) <= 5 + 6 - 1

    run_with(honest, body, tmp_path, overlap=overlap)


def test_request_ids_are_scoped_by_tenant(tmp_path):
    async def body(h: Harness) -> None:
        a, b = h.submit("same-id", tenant="a"), h.submit("same-id", tenant="b")
        assert h.loop.abort(("a", "same-id"))
        assert await outcome(a) == ([], common_pb2.FINISH_REASON_ABORT)
        assert await outcome(b) == (EXPECTED, common_pb2.FINISH_REASON_LENGTH)

    run_with(honest, body, tmp_path)


def test_stats_are_refused_while_no_worker_group_is_connected():
    config = SchedulerConfig(worker="unix:///nonexistent", listen="", max_num_batched_tokens=0, max_num_seqs=0,
                             policy="fcfs", tenant_weights="", no_prefix_caching=False, connect_timeout=1.0,
                             max_waiting_requests=4, step_timeout=1.0, step_timeout_per_token=0.0,
                             keepalive_seconds=20.0, exit_with_parent=False, log_level="info")
    loop = EngineLoop(config, on_ready_change=lambda ready: None)
    with pytest.raises(RequestRejected) as raised:  # not counters of zero: nothing is known
        loop.stats()
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE


def test_the_scheduler_holds_at_most_a_batch_and_its_queue(tmp_path):
    async def body(h: Harness) -> None:
        queues = [h.submit(f"r{i}", max_new_tokens=1) for i in range(64 + DESCRIPTION.max_num_seqs)]
        with pytest.raises(RequestRejected) as raised:
            h.submit("one-too-many")
        assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        results = await asyncio.gather(*[outcome(q) for q in queues])
        assert all(ended == common_pb2.FINISH_REASON_LENGTH for _, ended in results)

    run_with(honest, body, tmp_path)
