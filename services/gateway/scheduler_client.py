"""The gateway's link to the scheduler: a channel, its stubs, and whether it is ready."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inflight.v1 import scheduler_pb2, scheduler_pb2_grpc

log = structlog.get_logger()

CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


class SchedulerClient:
    def __init__(self, target: str) -> None:
        self.channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.stub = scheduler_pb2_grpc.SchedulerStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)
        self.model_info: scheduler_pb2.ModelInfo | None = None

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
                        self.model_info = await self.stub.GetModelInfo(scheduler_pb2.GetModelInfoRequest(), timeout=10)
                        log.info("scheduler_ready", model=self.model_info.model_name,
                                 max_model_len=self.model_info.max_model_len)
                    elif not serving:
                        self.model_info = None
                    on_ready_change(self.ready)
            except grpc.aio.AioRpcError as error:
                log.warning("scheduler_unreachable", code=error.code().name)
            self.model_info = None
            on_ready_change(False)
            await asyncio.sleep(0.5)

    async def close(self) -> None:
        await self.channel.close()
