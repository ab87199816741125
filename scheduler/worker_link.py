"""The scheduler's end of the step stream to worker rank 0."""

from __future__ import annotations

import asyncio

import grpc

from inflight.connection import STREAM_GONE, KeepalivePolicy
from inflight.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from scheduler.planned_step import PlannedStep
from scheduler.request import Request

MESSAGE_LIMITS = [
    ("grpc.max_send_message_length", 64 * 2**20),
    ("grpc.max_receive_message_length", 64 * 2**20),
]


class WorkerUnavailable(RuntimeError):
    """The step stream is gone: the worker group must be connected to again."""


class StepTimedOut(WorkerUnavailable):
    """A step outlived its watchdog bound: a rank hangs, and the group is being replaced."""


def needs_history(sampling: common_pb2.SamplingParams) -> bool:
    return (sampling.repetition_penalty != 1.0 or sampling.presence_penalty != 0.0
            or sampling.frequency_penalty != 0.0)


def new_sequence(request: Request) -> worker_pb2.NewSequence:
    return worker_pb2.NewSequence(
        request_id=request.request_id, slot_id=request.slot_id, sampling=request.sampling,
        num_prompt_tokens=len(request.prompt_token_ids), stop_token_ids=sorted(request.stop_token_ids),
        # Up to the end of its first chunk (planned just now): never the token that chunk is to sample.
        context_token_ids=request.token_ids(0, request.num_computed_tokens) if needs_history(request.sampling) else [],
    )


def plan_to_proto(step: PlannedStep, timeout_seconds: float) -> worker_pb2.StepPlan:
    return worker_pb2.StepPlan(
        step_id=step.step_id,
        released_slot_ids=step.released_slot_ids,
        new_sequences=[new_sequence(r) for r in step.admitted],
        sequences=worker_pb2.ScheduledSequences(
            slot_ids=step.slot_ids.tolist(), num_computed_tokens=step.num_computed_tokens.tolist(),
            num_tokens=step.num_tokens.tolist(), token_ids=step.token_ids.tolist(),
            num_new_blocks=step.num_new_blocks.tolist(), new_block_ids=step.new_block_ids.tolist(),
            sample=step.sample.tolist(),
        ),
        timeout_seconds=timeout_seconds,
    )


class WorkerLink:
    def __init__(self, target: str, keepalive: KeepalivePolicy) -> None:
        self.target = target
        self.options = MESSAGE_LIMITS + keepalive.client_options()
        self._channel: grpc.aio.Channel | None = None
        self._call: grpc.aio.StreamStreamCall | None = None

    async def connect(self, timeout: float) -> tuple[worker_pb2.WorkerDescription, worker_pb2.WarmupResponse]:
        """Describe, warm up, then open the step stream."""
        await self.close()
        self._channel = grpc.aio.insecure_channel(self.target, options=self.options)
        stub = worker_pb2_grpc.WorkerStub(self._channel)
        try:
            description = await stub.Describe(worker_pb2.DescribeRequest(), wait_for_ready=True, timeout=timeout)
            warmup = await stub.Warmup(worker_pb2.WarmupRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as error:
            raise WorkerUnavailable(f"worker {self.target}: {error.code().name}: {error.details()}") from error
        self._call = stub.Run()
        return description, warmup

    async def send(self, plan: worker_pb2.StepPlan) -> None:
        """Send one plan; its result comes back, in order, from receive()."""
        if self._call is None:
            raise WorkerUnavailable("not connected")
        try:
            await self._call.write(plan)
        except STREAM_GONE as error:
            raise WorkerUnavailable(f"worker stream broke: {error!r}") from error

    async def receive(self, plan: worker_pb2.StepPlan) -> worker_pb2.StepResult:
        """The result of the oldest plan sent, waiting at most plan.timeout_seconds (when set)."""
        if self._call is None:
            raise WorkerUnavailable("not connected")
        try:
            read = self._call.read()
            result = await (asyncio.wait_for(read, plan.timeout_seconds) if plan.timeout_seconds else read)
        except asyncio.TimeoutError as error:
            raise StepTimedOut(f"step {plan.step_id} did not finish within {plan.timeout_seconds:.1f} s") from error
        except STREAM_GONE as error:
            raise WorkerUnavailable(f"worker stream broke: {error!r}") from error
        if result is grpc.aio.EOF:
            raise WorkerUnavailable("worker closed the step stream")
        if result.step_id != plan.step_id:
            raise WorkerUnavailable(f"worker answered step {result.step_id} to step {plan.step_id}")
        return result

    async def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
            self._call = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
