"""Rank 0's gRPC service: the scheduler's handshake and its bidirectional step stream.

Steps are pipelined: a plan that arrives while the step before is still on the device is launched
at once, behind it, and each result is sent, in order, as soon as its step is done. A reader thread
hands plans over and a waiter thread says when a step's device work is done; the stream's own
thread does the rest.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import structlog

from inflight.v1 import worker_pb2, worker_pb2_grpc
from worker.codec import description_to_proto, output_to_proto, step_from_proto
from worker.engine_thread import EngineThread
from worker.group import WorkerGroup
from worker.step import PendingStep, Step, StepOutput, StepRejected
from worker.step_profiler import StepProfiler
from worker.validation import check_step
from worker.watchdog import StepWatchdog

log = structlog.get_logger()

# A scheduler that reconnects may arrive while its old stream is still being torn down.
_HANDOVER_SECONDS = 5.0


@dataclass
class _Launched:
    step_id: int
    bound_seconds: float
    pending: PendingStep | None = None         # None: answered at once with result
    result: worker_pb2.StepResult | None = None
    ready: bool = False                        # its outputs can be read without waiting on the device


class WorkerService(worker_pb2_grpc.WorkerServicer):
    def __init__(self, group: WorkerGroup, watchdog: StepWatchdog, engine_thread: EngineThread,
                 profiler: StepProfiler | None = None) -> None:
        """profiler: a look at the device's timeline over some steps, for benchmarks (--profile-steps)."""
        self.group = group
        self.watchdog = watchdog
        self.engine_thread = engine_thread
        self.description = group.describe()
        self._stream_lock = threading.Lock()
        self.profiler = profiler

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
        inbox: queue.SimpleQueue[worker_pb2.StepPlan | _Launched | None] = queue.SimpleQueue()
        waiting: queue.SimpleQueue[_Launched | None] = queue.SimpleQueue()
        threading.Thread(target=_read_plans, args=(plans, inbox), name="step-plans", daemon=True).start()
        threading.Thread(target=_wait_for_devices, args=(waiting, inbox), name="step-waiter", daemon=True).start()
        launched: deque[_Launched] = deque()
        try:
            while (item := inbox.get()) is not None:
                if isinstance(item, _Launched):
                    item.ready = True
                else:
                    if not launched:  # the watchdog bounds the oldest step not yet answered
                        self.watchdog.arm(item.step_id, item.timeout_seconds)
                    entry = self._launch(item)
                    launched.append(entry)
                    if entry.pending is not None:
                        waiting.put(entry)
                while launched and launched[0].ready:
                    yield self._finish(launched.popleft())
                    if launched:
                        self.watchdog.arm(launched[0].step_id, launched[0].bound_seconds)
                    else:
                        self.watchdog.disarm()
        finally:
            waiting.put(None)
            self.watchdog.disarm()
            # A new stream starts from a clean slate: the scheduler re-admits what it still runs.
            self.engine_thread.call(self.group.release_all)
            self._stream_lock.release()
            log.info("scheduler_disconnected")

    def _launch(self, plan: worker_pb2.StepPlan) -> _Launched:
        step = step_from_proto(plan)
        entry = _Launched(step.step_id, plan.timeout_seconds)
        try:
            check_step(step, self.description, self.group.slot_tables)
        except StepRejected as error:
            log.warning("step_rejected", step_id=step.step_id, error=str(error))
            entry.result, entry.ready = worker_pb2.StepResult(step_id=step.step_id, error=str(error)), True
            return entry
        for admission in step.admissions:
            log.info("sequence_admitted", request_id=admission.request_id, slot_id=admission.slot_id,
                     step_id=step.step_id)
        try:
            entry.pending = self.engine_thread.call(lambda: self._launch_on_engine_thread(step))
        except Exception as error:  # the step is lost; the group and every other step are not
            log.exception("step_failed", step_id=step.step_id)
            entry.result = worker_pb2.StepResult(step_id=step.step_id,
                                                 error=f"the engine failed the step: {type(error).__name__}")
            entry.ready = True
        return entry

    def _finish(self, entry: _Launched) -> worker_pb2.StepResult:
        if entry.result is not None:
            return entry.result
        pending = entry.pending
        assert pending is not None
        try:
            output = self.engine_thread.call(lambda: self._result_on_engine_thread(pending))
        except Exception as error:
            log.exception("step_failed", step_id=entry.step_id)
            return worker_pb2.StepResult(step_id=entry.step_id, error=f"the engine failed the step: {type(error).__name__}")
        for failure in output.failures:
            log.error("sequence_failed", slot_id=failure.slot_id, step_id=entry.step_id, error=failure.message)
        return output_to_proto(output)

    def _launch_on_engine_thread(self, step: Step) -> PendingStep:
        if self.profiler is None:
            return self.group.launch(step)
        self.profiler.launching(step.all_single_token)
        pending = self.group.launch(step)
        self.profiler.launched_step()
        return pending

    def _result_on_engine_thread(self, pending: PendingStep) -> StepOutput:
        try:
            return pending.result()
        finally:
            if self.profiler is not None:
                self.profiler.finished()


def _read_plans(plans: Iterator[worker_pb2.StepPlan], inbox: queue.SimpleQueue) -> None:
    """Hand each plan to the stream's thread; None when the scheduler's side ends (or breaks)."""
    try:
        for plan in plans:
            inbox.put(plan)
    except Exception:  # the call was cancelled or broke: the stream is over either way
        pass
    finally:
        inbox.put(None)


def _wait_for_devices(waiting: queue.SimpleQueue, inbox: queue.SimpleQueue) -> None:
    """Say, in launch order, when each launched step's outputs can be read; ends at None."""
    while (entry := waiting.get()) is not None:
        try:
            entry.pending.wait()
        except Exception:  # result() raises the same error on the stream's thread
            pass
        inbox.put(entry)
