"""inflight.v1.Admin: operator endpoints, answered from the scheduler."""

from __future__ import annotations

import grpc

from inflight.v1 import common_pb2, generation_pb2_grpc
from services.gateway.scheduler_client import SchedulerClient


class AdminService(generation_pb2_grpc.AdminServicer):
    def __init__(self, scheduler: SchedulerClient) -> None:
        self.scheduler = scheduler

    async def GetStats(self, request: common_pb2.GetStatsRequest, context: grpc.aio.ServicerContext) -> common_pb2.Stats:
        try:
            stats = await self.scheduler.stub.GetStats(request, timeout=5)
        except grpc.aio.AioRpcError as error:
            # Not ready (no worker group) or unreachable: the counters cannot be known, so no zeros.
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the scheduler cannot report its state right now "
                                                             f"({error.code().name}); retry")
            raise
        stats.scheduler_restarts = self.scheduler.restarts
        return stats
