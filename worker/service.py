"""Rank 0's gRPC service: the scheduler's handshake and its bidirectional step stream."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import structlog

from inflight.v1 import worker_pb2, worker_pb2_grpc
from worker.codec import description_to_proto, output_to_proto, step_from_proto
from worker.engine_thread import EngineThread
from worker.group import WorkerGroup
from worker.step import StepRejected
from worker.validation import check_step
from worker.watchdog import StepWatchdog

log = structlog.get_logger()

# A scheduler that reconnects may arrive while its old stream is still being torn down.
_HANDOVER_SECONDS = 5.0


class WorkerService(worker_pb2_grpc.WorkerServicer):
    def __init__(self, group: WorkerGroup, watchdog: StepWatchdog, engine_thread: EngineThread) -> None:
        self.group = group
        self.watchdog = watchdog
        self.engine_thread = engine_thread
        self.description = group.describe()
        self._stream_lock = threading.Lock()

    def Describe(self, request: worker_pb2.DescribeRequest, context: grpc.ServicerContext) -> worker_pb2.WorkerDescription:
        return description_to_proto(self.description)

    def Warmup(self, request: worker_pb2.WarmupRequest, context: grpc.ServicerContext) -> worker_pb2.WarmupResponse:
        if not self._stream_lock.acquire(timeout=_HANDOVER_SECONDS):
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "a scheduler is driving this worker; warm up first")
        try:
            start = time.perf_counter()
            num_blocks = self.engine_thread.call(self.group.warmup)
        finally:
            self._stream_lock.release()
        seconds = time.perf_counter() - start
        log.info("warmup_done", num_kv_blocks=num_blocks, seconds=round(seconds, 3))
        return worker_pb2.WarmupResponse(num_kv_blocks=num_blocks, warmup_seconds=seconds)

    def Run(self, plans: Iterator[worker_pb2.StepPlan], context: grpc.ServicerContext) -> Iterator[worker_pb2.StepResult]:
        if not self._stream_lock.acquire(timeout=_HANDOVER_SECONDS):
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "another scheduler is already driving this worker")
        log.info("scheduler_connected", peer=context.peer())
        try:
            for plan in plans:
                yield self._run_step(plan)
        finally:
            # A new stream starts from a clean slate: the scheduler re-admits what it still runs.
            self.engine_thread.call(self.group.release_all)
            self._stream_lock.release()
            log.info("scheduler_disconnected")

    def _run_step(self, plan: worker_pb2.StepPlan) -> worker_pb2.StepResult:
        step = step_from_proto(plan)
        try:
            check_step(step, self.description, self.group.block_tables())
        except StepRejected as error:
            log.warning("step_rejected", step_id=step.step_id, error=str(error))
            return worker_pb2.StepResult(step_id=step.step_id, error=str(error))
        for admission in step.admissions:
            log.info("sequence_admitted", request_id=admission.request_id, slot_id=admission.slot_id,
                     step_id=step.step_id)
        self.watchdog.arm(step.step_id, plan.timeout_seconds)
        try:
            output = self.engine_thread.call(lambda: self.group.step(step))
        except Exception as error:  # the step is lost; the group and every other step are not
            log.exception("step_failed", step_id=step.step_id)
            return worker_pb2.StepResult(step_id=step.step_id, error=f"the engine failed the step: {type(error).__name__}")
        finally:
            self.watchdog.disarm()
        for failure in output.failures:
            log.error("sequence_failed", slot_id=failure.slot_id, step_id=step.step_id, error=failure.message)
        return output_to_proto(output)
