"""The gateway's link to the scheduler: a channel, its stubs, and whether it is ready.

The channel reconnects by itself when the scheduler restarts; `watch` follows the scheduler's
health over it for ever, so the gateway turns SERVING again as soon as a new scheduler is ready.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inflight.connection import KeepalivePolicy
from inflight.v1 import scheduler_pb2, scheduler_pb2_grpc

log = structlog.get_logger()


class SchedulerClient:
    def __init__(self, target: str, keepalive: KeepalivePolicy | None = None,
                 interceptors: Sequence[grpc.aio.ClientInterceptor] = ()) -> None:
        options = (keepalive or KeepalivePolicy()).client_options()
        self.channel = grpc.aio.insecure_channel(target, options=options, interceptors=list(interceptors) or None)
        self.stub = scheduler_pb2_grpc.SchedulerStub(self.channel)
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

    def _note_instance(self, instance_id: str) -> None:
        if self._instance_id and instance_id != self._instance_id:
            self.restarts += 1
        self._instance_id = instance_id

    async def close(self) -> None:
        await self.channel.close()
