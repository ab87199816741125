"""The prefix cache's history, for routers that place requests where their prefix is cached.

The KV manager records what the cache stores and drops as it happens; once per step the
engine loop publishes what was recorded as one numbered batch. Batches are kept in a bounded
history, so a subscriber that reconnects resumes after the last batch it applied; one whose
cursor the history no longer reaches is told so (CursorExpired) and starts over from live
batches, rebuilding its view from a later KvCacheCleared or from what it sees stored.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator

from inflight.v1 import scheduler_pb2


class CursorExpired(Exception):
    """The batches after a subscriber's cursor are no longer (or not yet) in the history."""


def restart_safe_first_sequence() -> int:
    """A first sequence number above any an earlier process can have reached: 16 per millisecond of clock.

    A process publishes at most one batch a step, and no step (a round trip to the worker group
    among it) takes under 1/16 ms, so its numbers stay below the clock's; its successor's start
    above. A subscriber resuming across a restart then holds a cursor below the new history and gets
    OUT_OF_RANGE, never a silent continuation that misses the new process's KvCacheCleared.
    """
    return int(time.time() * 16_000)


class KvEventLog:
    def __init__(self, max_batches: int = 4096, first_sequence: int = 1) -> None:
        if max_batches < 1:
            raise ValueError("the KV event history keeps at least one batch")
        self._history: deque[scheduler_pb2.KvEventBatch] = deque(maxlen=max_batches)
        self._pending: list[scheduler_pb2.KvEvent] = []
        self._first_sequence = self._next_sequence = first_sequence
        self._published = asyncio.Event()  # set (and replaced) on every new batch or load
        self._load = scheduler_pb2.EngineLoad()
        self._load_version = 0
        self.subscribers = 0  # the load is worth computing only while someone listens

    @property
    def newest(self) -> int:
        """The sequence number of the newest published batch (first_sequence - 1: none yet)."""
        return self._next_sequence - 1

    # --- recording (the engine loop's thread, between awaits) ---------------------------

    def stored(self, blocks: list[tuple[int, list[int]]], parent_hash: int | None, block_size: int,
               cache_salt: str, tenant: str) -> None:
        """Full blocks, each (hash, token ids), chained from parent_hash."""
        event = scheduler_pb2.KvEvent()
        stored = event.stored
        stored.cache_salt, stored.tenant = cache_salt, tenant
        if parent_hash is not None:
            stored.parent_block_hash = parent_hash
        for block_hash, token_ids in blocks:
            stored.blocks.add(block_hash=block_hash, token_ids=token_ids, block_size=block_size)
        self._pending.append(event)

    def removed(self, block_hash: int) -> None:
        last = self._pending[-1] if self._pending else None
        if last is not None and last.HasField("removed"):
            last.removed.block_hashes.append(block_hash)
        else:
            self._pending.append(scheduler_pb2.KvEvent(removed=scheduler_pb2.KvBlocksRemoved(block_hashes=[block_hash])))

    def cleared(self) -> None:
        """Every block is gone: what was recorded but not yet published no longer matters."""
        self._pending = [scheduler_pb2.KvEvent(cleared=scheduler_pb2.KvCacheCleared())]

    def set_load(self, load: scheduler_pb2.EngineLoad) -> None:
        """The scheduler's load now; subscribers hear of a change with the next batch, or alone."""
        if load != self._load:
            self._load = load
            self._load_version += 1
            self._wake()

    def publish(self) -> None:
        """What was recorded since the last call becomes the next batch (none if nothing was)."""
        if not self._pending:
            return
        batch = scheduler_pb2.KvEventBatch(sequence_number=self._next_sequence, timestamp=time.time(),
                                           events=self._pending, load=self._load)
        self._pending = []
        self._next_sequence += 1
        self._history.append(batch)
        self._wake()

    def _wake(self) -> None:
        published, self._published = self._published, asyncio.Event()
        published.set()

    def _load_record(self, cursor: int) -> scheduler_pb2.KvEventBatch:
        return scheduler_pb2.KvEventBatch(sequence_number=cursor, timestamp=time.time(), load=self._load,
                                          load_only=True)

    # --- subscribers ------------------------------------------------------------------------

    async def subscribe(self, cursor: int, heartbeat_seconds: float = 1.0) -> AsyncIterator[scheduler_pb2.KvEventBatch]:
        """Every batch after cursor (0: see the module), then each new one, for ever; between batches a
        load record when the load changes, and one every heartbeat_seconds while nothing else goes out."""
        oldest = self._history[0].sequence_number if self._history else self._next_sequence
        if cursor > self.newest:
            raise CursorExpired(f"start_sequence_number {cursor} is past the newest batch {self.newest}")
        if 0 < cursor < self._first_sequence - 1:
            raise CursorExpired(f"start_sequence_number {cursor} is from before this scheduler's first batch "
                                f"{self._first_sequence} (a scheduler that restarts numbers afresh): resubscribe with 0")
        if cursor == 0:  # the whole history if it still holds the first batch, else live batches only
            cursor = self._first_sequence - 1 if oldest == self._first_sequence else self.newest
        self.subscribers += 1
        try:
            async for batch in self._follow(cursor, heartbeat_seconds):
                yield batch
        finally:
            self.subscribers -= 1

    async def _follow(self, cursor: int, heartbeat_seconds: float) -> AsyncIterator[scheduler_pb2.KvEventBatch]:
        load_sent = -1
        while True:
            waiter, load_version = self._published, self._load_version
            oldest = self._history[0].sequence_number if self._history else self._next_sequence
            if cursor + 1 < oldest:
                raise CursorExpired(f"batches {cursor + 1} to {oldest - 1} are no longer kept "
                                    f"(the history holds {self._history.maxlen} batches)")
            for batch in list(self._history)[cursor + 1 - oldest:]:
                yield batch
                cursor = batch.sequence_number
            if cursor != self.newest:
                continue
            if load_sent != load_version:
                yield self._load_record(cursor)  # the latest load, whichever batch carried an older one
                load_sent = load_version
                continue
            try:
                await asyncio.wait_for(waiter.wait(), heartbeat_seconds)
            except asyncio.TimeoutError:  # the builtin TimeoutError from Python 3.11
                load_sent = -1  # quiet for a while: say the load again
