"""A gateway's session: many requests on one stream, and each step's events for all of them in one message.

The engine loop hands each request's events to its sink as it does a Submit call's queue; a session's sinks
all write into one outbox, and the session's stream sends whatever the outbox holds as one SessionEvents
whenever it gets to run (once per step under load, since a step's events are handed over together).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc

from inflight.v1 import common_pb2, scheduler_pb2
from scheduler.engine_loop import Failure, StreamItem
from scheduler.request import RequestKey


class SessionOutbox:
    def __init__(self) -> None:
        self.events: list[scheduler_pb2.SessionEvent] = []
        self.ready = asyncio.Event()        # set when events wait, or when the stream of requests ended
        self.live: set[RequestKey] = set()  # submitted, not ended: aborted if the session ends

    def sink(self, key: RequestKey) -> RequestSink:
        return RequestSink(self, key)

    def put(self, key: RequestKey, item: StreamItem) -> None:
        tenant, request_id = key
        if isinstance(item, Failure):
            self.end(key, item.code, item.message)
            return
        self.events.append(scheduler_pb2.SessionEvent(tenant=tenant, request_id=request_id, event=item))
        if item.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
            self.live.discard(key)
        self.ready.set()

    def end(self, key: RequestKey, code: grpc.StatusCode, message: str) -> None:
        """The request ends with a status (rejected, or failed)."""
        tenant, request_id = key
        self.events.append(scheduler_pb2.SessionEvent(tenant=tenant, request_id=request_id,
                                                      status_code=code.value[0], status_message=message))
        self.live.discard(key)
        self.ready.set()

    def take(self) -> list[scheduler_pb2.SessionEvent]:
        events, self.events = self.events, []
        self.ready.clear()
        return events


@dataclass(frozen=True)
class RequestSink:
    """One request's events, into its session's outbox (what the engine loop calls a stream)."""

    outbox: SessionOutbox
    key: RequestKey

    def put_nowait(self, item: StreamItem) -> None:
        self.outbox.put(self.key, item)
