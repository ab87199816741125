"""The gateway's link to the scheduler: a channel, its stubs, whether it is ready, and each request's events.

The channel reconnects by itself when the scheduler restarts; `watch` follows the scheduler's
health over it for ever, so the gateway turns SERVING again as soon as a new scheduler is ready.
Requests go on one session stream (services/gateway/scheduler_session.py) when the scheduler says it serves
them, or one Submit call each: when the gateway traces (a call per request carries its trace to the
scheduler), or for a scheduler without sessions.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inflight.connection import KeepalivePolicy
from inflight.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from services.gateway.scheduler_session import SchedulerSession, SessionBroken

log = structlog.get_logger()

_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}


class SchedulerError(Exception):
    """The scheduler ended a request with a gRPC status (or the link to it broke)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class SchedulerClient:
    def __init__(self, target: str, keepalive: KeepalivePolicy | None = None,
                 interceptors: Sequence[grpc.aio.ClientInterceptor] = ()) -> None:
        options = (keepalive or KeepalivePolicy()).client_options()
        self.channel = grpc.aio.insecure_channel(target, options=options, interceptors=list(interceptors) or None)
        self.stub = scheduler_pb2_grpc.SchedulerStub(self.channel)
        self.session = SchedulerSession(self.stub)
        self.use_sessions = not interceptors  # a traced gateway sends each request's trace on its own call
        self._health = health_pb2_grpc.HealthStub(self.channel)
        self.model_info: scheduler_pb2.ModelInfo | None = None
        self.restarts = 0  # schedulers found after the first (a new instance id)
        self._instance_id = ""

    @property
    def ready(self) -> bool:
        return self.model_info is not None

    async def watch(self, on_ready_change: Callable[[bool], None]) -> None:
        """Follow the scheduler's health for ever; fetch model info whenever it turns SERVING."""
        request = health_pb2.HealthCheckRequest(service="inflight.v1.Scheduler")
        while True:
            try:
                async for update in self._health.Watch(request, wait_for_ready=True):
                    serving = update.status == health_pb2.HealthCheckResponse.SERVING
                    if serving and not self.ready:
                        info = await self.stub.GetModelInfo(scheduler_pb2.GetModelInfoRequest(), timeout=10)
                        self._note_instance(info.instance_id)
                        self.model_info = info
                        log.info("scheduler_ready", model=info.model_name, max_model_len=info.max_model_len,
                                 scheduler_restarts=self.restarts)
                    elif not serving:
                        self.model_info = None
                    on_ready_change(self.ready)
            except grpc.aio.AioRpcError as error:
                log.warning("scheduler_unreachable", code=error.code().name)
            self.model_info = None
            on_ready_change(False)
            await asyncio.sleep(0.2)

    def held_elsewhere(self) -> int:
        """Requests the scheduler holds for other gateway processes, as far as this one knows (0 without sessions)."""
        return self.session.held_elsewhere() if self.use_sessions else 0

    async def generate(self, submit: scheduler_pb2.SubmitRequest, timeout: float | None
                       ) -> AsyncIterator[scheduler_pb2.TokenEvent]:
        """A request's events until its last; raises SchedulerError. Closing it early stops the request."""
        if self.use_sessions and self.model_info is not None and self.model_info.sessions:
            queue = await self.session.submit(submit)
            ended = False
            try:
                while not ended:
                    item = await queue.get()
                    ended = True
                    if isinstance(item, SessionBroken):
                        raise SchedulerError(item.code, item.details)
                    if item.status_code:
                        raise SchedulerError(_STATUS_CODES.get(item.status_code, grpc.StatusCode.UNKNOWN),
                                             item.status_message)
                    ended = item.event.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
                    yield item.event
            finally:
                if not ended:
                    self.session.abort(submit.tenant, submit.request_id)  # the scheduler stops it
            return
        call = self.stub.Submit(submit, timeout=timeout)
        try:
            async for event in call:
                yield event
        except grpc.aio.AioRpcError as error:
            raise SchedulerError(error.code(), error.details() or error.code().name) from error
        finally:
            if not call.done():
                call.cancel()  # the scheduler aborts the request

    def _note_instance(self, instance_id: str) -> None:
        if self._instance_id and instance_id != self._instance_id:
            self.restarts += 1
        self._instance_id = instance_id

    async def close(self) -> None:
        await self.session.close()
        await self.channel.close()
