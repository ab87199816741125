"""The scheduler's gRPC service for gateways: Submit streams, Abort, stats, model info, KV events."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import grpc
import structlog

from inflight.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from scheduler.engine_loop import EngineLoop, Failure, RequestRejected, StreamItem
from scheduler.kv_events import CursorExpired
from scheduler.session import SessionOutbox

log = structlog.get_logger()


class SchedulerService(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, loop: EngineLoop) -> None:
        self.loop = loop
        self.instance_id = uuid.uuid4().hex  # tells gateways apart this process from its predecessor

    async def Submit(self, request: scheduler_pb2.SubmitRequest,
                     context: grpc.aio.ServicerContext) -> AsyncIterator[scheduler_pb2.TokenEvent]:
        queue: asyncio.Queue[StreamItem] = asyncio.Queue()
        try:
            self.loop.submit(request, queue)
        except RequestRejected as rejected:
            await context.abort(rejected.code, rejected.message)
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, Failure):
                    finished = True
                    await context.abort(item.code, item.message)
                finished = item.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
                yield item
        finally:
            if not finished:  # the gateway cancelled or went away
                self.loop.abort((request.tenant, request.request_id))

    async def Session(self, requests: AsyncIterator[scheduler_pb2.SessionRequest],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[scheduler_pb2.SessionEvents]:
        outbox = SessionOutbox()
        reader = asyncio.create_task(self._read_session(requests, outbox))
        try:
            while not (reader.done() and not outbox.live and not outbox.events):
                await outbox.ready.wait()
                events = outbox.take()
                if events:
                    yield scheduler_pb2.SessionEvents(events=events, requests_held=self.loop.requests_held())
            await reader  # its error, if it failed
        finally:
            reader.cancel()
            for key in list(outbox.live):  # the gateway went away, or the stream broke
                self.loop.abort(key)  # which ends the request in the outbox: a copy is iterated

    async def _read_session(self, requests: AsyncIterator[scheduler_pb2.SessionRequest], outbox: SessionOutbox) -> None:
        try:
            async for message in requests:
                if message.HasField("submit"):
                    submit = message.submit
                    key = (submit.tenant, submit.request_id)
                    try:
                        self.loop.submit(submit, outbox.sink(key))
                        outbox.live.add(key)
                    except RequestRejected as rejected:
                        outbox.end(key, rejected.code, rejected.message)
                elif message.HasField("abort"):
                    self.loop.abort((message.abort.tenant, message.abort.request_id))
        finally:
            outbox.ready.set()  # the writer notices the end of the requests

    async def Abort(self, request: scheduler_pb2.SchedulerAbortRequest,
                    context: grpc.aio.ServicerContext) -> scheduler_pb2.SchedulerAbortResponse:
        return scheduler_pb2.SchedulerAbortResponse(found=self.loop.abort((request.tenant, request.request_id)))

    async def GetStats(self, request: common_pb2.GetStatsRequest, context: grpc.aio.ServicerContext) -> common_pb2.Stats:
        try:
            return self.loop.stats()
        except RequestRejected as rejected:
            await context.abort(rejected.code, rejected.message)
            raise

    async def GetModelInfo(self, request: scheduler_pb2.GetModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> scheduler_pb2.ModelInfo:
        d, planner = self.loop.description, self.loop.planner
        if d is None or planner is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the worker group is not ready")
        return scheduler_pb2.ModelInfo(
            model_name=d.model_name, vocab_size=d.vocab_size, max_model_len=planner.limits.max_model_len,
            eos_token_ids=d.eos_token_ids, tp_size=d.tp_size, engine=d.engine, device=d.device,
            block_size=d.block_size, instance_id=self.instance_id, sessions=True,
        )

    async def SubscribeKvEvents(self, request: scheduler_pb2.SubscribeKvEventsRequest,
                                context: grpc.aio.ServicerContext) -> AsyncIterator[scheduler_pb2.KvEventBatch]:
        await context.send_initial_metadata(())  # a subscriber knows at once that the stream is up
        try:
            async for batch in self.loop.kv_events.subscribe(request.start_sequence_number):
                yield batch
        except CursorExpired as expired:
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, str(expired))
