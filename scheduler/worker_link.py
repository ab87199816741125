"""The scheduler's end of the step stream to worker rank 0."""

from __future__ import annotations

import grpc

from inflight.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from scheduler.planner import PlannedStep
from scheduler.request import Request

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 * 2**20),
    ("grpc.max_receive_message_length", 64 * 2**20),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


class WorkerUnavailable(RuntimeError):
    pass


def needs_history(sampling: common_pb2.SamplingParams) -> bool:
    return (sampling.repetition_penalty not in (0.0, 1.0) or sampling.presence_penalty != 0.0
            or sampling.frequency_penalty != 0.0)


def new_sequence(request: Request) -> worker_pb2.NewSequence:
    return worker_pb2.NewSequence(
        request_id=request.request_id, slot_id=request.slot_id, sampling=request.sampling,
        num_prompt_tokens=len(request.prompt_token_ids), stop_token_ids=sorted(request.stop_token_ids),
        context_token_ids=request.token_ids(0, request.num_tokens) if needs_history(request.sampling) else [],
    )


def plan_to_proto(step: PlannedStep) -> worker_pb2.StepPlan:
    return worker_pb2.StepPlan(
        step_id=step.step_id,
        released_slot_ids=step.released_slot_ids,
        new_sequences=[new_sequence(r) for r in step.admitted],
        sequences=[
            worker_pb2.ScheduledSequence(
                slot_id=c.request.slot_id, token_ids=c.token_ids, num_computed_tokens=c.num_computed_tokens,
                new_block_ids=c.new_block_ids, sample=c.sample,
            )
            for c in step.chunks
        ],
    )


class WorkerLink:
    def __init__(self, target: str) -> None:
        self.target = target
        self._channel: grpc.aio.Channel | None = None
        self._call: grpc.aio.StreamStreamCall | None = None

    async def connect(self, timeout: float) -> tuple[worker_pb2.WorkerDescription, worker_pb2.WarmupResponse]:
        """Describe, warm up, then open the step stream."""
        await self.close()
        self._channel = grpc.aio.insecure_channel(self.target, options=CHANNEL_OPTIONS)
        stub = worker_pb2_grpc.WorkerStub(self._channel)
        try:
            description = await stub.Describe(worker_pb2.DescribeRequest(), wait_for_ready=True, timeout=timeout)
            warmup = await stub.Warmup(worker_pb2.WarmupRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as error:
            raise WorkerUnavailable(f"worker {self.target}: {error.code().name}: {error.details()}") from error
        self._call = stub.Run()
        return description, warmup

    async def step(self, plan: worker_pb2.StepPlan) -> worker_pb2.StepResult:
        if self._call is None:
            raise WorkerUnavailable("not connected")
        try:
            await self._call.write(plan)
            result = await self._call.read()
        except (grpc.aio.AioRpcError, grpc.aio.UsageError) as error:
            raise WorkerUnavailable(f"worker stream broke: {error}") from error
        if result is grpc.aio.EOF:
            raise WorkerUnavailable("worker closed the step stream")
        return result

    async def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
            self._call = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
