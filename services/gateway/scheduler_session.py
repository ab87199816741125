"""The gateway's session with the scheduler: every request on one stream (scheduler.proto's Session).

Submits and aborts are written to the stream; a reader hands each SessionEvent to its request's queue, so a
step's tokens for every request arrive in one message instead of one message per request. When the stream
breaks (the scheduler restarted or went away) every request on it ends with that status, and the next submit
opens a new session.

Each message also says how many requests the scheduler holds from every gateway. What it holds beyond this
session's own requests (held_elsewhere) is what other gateway processes on the same scheduler have sent, so a
gateway can refuse past the common bound before any work. A figure older than HELD_FRESH_SECONDS counts as 0:
the scheduler writes only to sessions with events, and another gateway's requests may have ended since.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from dataclasses import dataclass

import grpc

from inflight.connection import STREAM_GONE
from inflight.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc

RequestKey = tuple[str, str]  # (tenant, request id)
HELD_FRESH_SECONDS = 0.5


@dataclass(frozen=True)
class SessionBroken:
    """The stream a request was on ended before the request did."""

    code: grpc.StatusCode
    details: str


SessionItem = scheduler_pb2.SessionEvent | SessionBroken


class SchedulerSession:
    def __init__(self, stub: scheduler_pb2_grpc.SchedulerStub) -> None:
        self.stub = stub
        self._call: grpc.aio.StreamStreamCall | None = None
        self._queues: dict[RequestKey, asyncio.Queue[SessionItem]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._writing = asyncio.Lock()  # one write at a time on a stream
        self._held_elsewhere = 0  # the latest message's requests_held less this session's own, and when it came
        self._held_at = 0.0

    def held_elsewhere(self) -> int:
        """Requests the scheduler holds from other sessions (other gateway processes), by its latest message."""
        return self._held_elsewhere if time.monotonic() - self._held_at <= HELD_FRESH_SECONDS else 0

    async def submit(self, submit: scheduler_pb2.SubmitRequest) -> asyncio.Queue[SessionItem]:
        """Send a request; its events (and a SessionBroken if the stream ends first) arrive on the queue."""
        call = self._open()
        queue: asyncio.Queue[SessionItem] = asyncio.Queue()
        self._queues[(submit.tenant, submit.request_id)] = queue
        try:
            await asyncio.shield(self._send(call, scheduler_pb2.SessionRequest(submit=submit)))
        except asyncio.CancelledError:  # the client went away while its submit was being written
            self.abort(submit.tenant, submit.request_id)  # written after the submit: writes keep their order
            raise
        return queue

    def abort(self, tenant: str, request_id: str) -> None:
        """Stop a request (its client went away, or a stop string ended it); its later events are dropped."""
        if self._queues.pop((tenant, request_id), None) is None or self._call is None or self._call.done():
            return
        self._send(self._call, scheduler_pb2.SessionRequest(
            abort=scheduler_pb2.SchedulerAbortRequest(tenant=tenant, request_id=request_id)))

    def _open(self) -> grpc.aio.StreamStreamCall:
        if self._call is None or self._call.done():
            self._call, self._queues = self.stub.Session(), {}
            self._spawn(self._read(self._call, self._queues))
        return self._call

    def _send(self, call: grpc.aio.StreamStreamCall, message: scheduler_pb2.SessionRequest) -> asyncio.Task[None]:
        """Write on a task of its own. grpc.aio cancels a whole call when a write on it is cancelled, so a
        request's handler, cancelled when its client goes away, must never be the one awaiting the write:
        that would end the stream, and every other request on it, UNAVAILABLE."""
        return self._spawn(self._write(call, message))

    def _spawn(self, work: Coroutine[object, object, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)  # held until done, as a task must be
        task.add_done_callback(self._tasks.discard)
        return task

    async def _write(self, call: grpc.aio.StreamStreamCall, message: scheduler_pb2.SessionRequest) -> None:
        try:
            async with self._writing:
                await call.write(message)
        except STREAM_GONE:
            pass  # the reader ends every request on this stream

    async def _read(self, call: grpc.aio.StreamStreamCall, queues: dict[RequestKey, asyncio.Queue[SessionItem]]) -> None:
        broken = SessionBroken(grpc.StatusCode.UNAVAILABLE, "the scheduler ended the session")
        try:
            async for batch in call:
                for event in batch.events:
                    key = (event.tenant, event.request_id)
                    queue = queues.get(key)
                    if queue is None:
                        continue  # aborted by the gateway
                    queue.put_nowait(event)
                    if event.status_code or event.event.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
                        del queues[key]
                # this session's requests not yet ended count in the figure, save those the scheduler has yet to
                # read: the estimate errs towards admitting, and the scheduler's own bound has the last word
                self._held_elsewhere, self._held_at = max(0, batch.requests_held - len(queues)), time.monotonic()
        except grpc.aio.AioRpcError as error:
            broken = SessionBroken(error.code(), error.details() or error.code().name)
        finally:
            for queue in queues.values():
                queue.put_nowait(broken)
            queues.clear()

    async def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
