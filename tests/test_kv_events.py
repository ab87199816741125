"""The prefix cache's event stream: what a router rebuilds from it is what the cache holds.

The planner runs against a simulated worker cache (tests/test_planner.py's), so every published
block can be checked against the tokens the worker would really hold in it.
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inflight.v1 import scheduler_pb2
from scheduler.engine_loop import engine_load
from scheduler.kv_events import CursorExpired, KvEventLog
from scheduler.planner import BatchPlanner, PlannerLimits
from scheduler.policy import FcfsPolicy
from tests.test_planner import Driver, SimulatedKv, apply, limits_strategy, make_request


class RouterView:
    """What a subscriber knows from the batches it applied: key → (token ids, parent key)."""

    def __init__(self) -> None:
        self.blocks: dict[int, tuple[list[int], int | None]] = {}
        self.cursor = 0

    def apply(self, batch: scheduler_pb2.KvEventBatch) -> None:
        if batch.load_only:
            assert not batch.events and batch.sequence_number == self.cursor, "a load record repeats the last batch"
            return
        assert batch.sequence_number == self.cursor + 1, "batches are numbered without gaps"
        self.cursor = batch.sequence_number
        for event in batch.events:
            kind = event.WhichOneof("data")
            if kind == "cleared":
                self.blocks.clear()
            elif kind == "removed":
                for key in event.removed.block_hashes:
                    assert key in self.blocks, "a block is removed that was never stored"
                    del self.blocks[key]
            else:
                parent = event.stored.parent_block_hash if event.stored.HasField("parent_block_hash") else None
                for block in event.stored.blocks:
                    assert block.block_hash not in self.blocks, "a block is stored twice"
                    self.blocks[block.block_hash] = (list(block.token_ids), parent)
                    parent = block.block_hash


def drain(log: KvEventLog, cursor: int) -> list[scheduler_pb2.KvEventBatch]:
    """The batches after cursor that are published now."""
    async def take() -> list[scheduler_pb2.KvEventBatch]:
        batches: list[scheduler_pb2.KvEventBatch] = []
        if cursor == log.newest:
            return batches
        async for batch in log.subscribe(cursor):
            if batch.load_only:
                continue
            batches.append(batch)
            if batch.sequence_number == log.newest:
                return batches
        return batches
    return asyncio.run(take())


def assert_view_matches_cache(view: RouterView, planner: BatchPlanner, kv: SimulatedKv) -> None:
    bs = planner.limits.block_size
    indexed = planner.allocator.indexed()
    assert set(view.blocks) == set(indexed), "the router's view and the prefix index disagree"
    for key, block in indexed.items():
        assert view.blocks[key][0] == [kv.slots[(block, offset)] for offset in range(bs)], \
            "a published block's token ids are not what the worker's block holds"


@settings(max_examples=80, deadline=None)
@given(limits=limits_strategy, arrivals=st.lists(st.tuples(st.integers(1, 60), st.integers(1, 30), st.integers(0, 6),
                                                         st.sampled_from(["", "a"]), st.sampled_from(["", "s"])),
                                               max_size=25),
       seed=st.integers(0, 2**16), depth=st.sampled_from([1, 2, 3]))
def test_a_subscriber_rebuilds_the_prefix_index_exactly_after_every_step(limits, arrivals, seed, depth) -> None:
    log = KvEventLog(max_batches=100_000)
    planner = BatchPlanner(limits, FcfsPolicy(), events=log)
    log.cleared()
    log.publish()
    rng, view = random.Random(seed), RouterView()
    kv = SimulatedKv(limits.block_size, random.Random(seed))
    driver = Driver(planner, kv, depth)
    for index, (prompt_len, max_new, shared, tenant, salt) in enumerate(arrivals):
        if planner.blocks_needed_alone(prompt_len, max_new) > planner.allocator.num_usable:
            continue
        request = make_request(index, prompt_len, max_new, shared=shared, tenant=tenant)
        request.cache_salt = salt
        planner.add(request)
        for _ in range(rng.randint(0, 3)):
            if not driver.idle():
                driver.advance()
                log.publish()
                for batch in drain(log, view.cursor):
                    view.apply(batch)
                assert_view_matches_cache(view, planner, kv)
    while not driver.idle():
        driver.advance()
        log.publish()
    for batch in drain(log, view.cursor):
        view.apply(batch)
    assert_view_matches_cache(view, planner, kv)


def serve_one(planner: BatchPlanner, request, kv: SimulatedKv, log: KvEventLog) -> None:  # noqa: ANN001
    planner.add(request)
    driver = Driver(planner, kv, depth=1)
    while not driver.idle():
        driver.advance()
        log.publish()


def test_stored_blocks_carry_their_tokens_a_hit_stores_nothing_new_and_eviction_removes_them() -> None:
    limits = PlannerLimits(max_num_batched_tokens=256, max_num_seqs=4, max_model_len=512, block_size=4, num_kv_blocks=13)
    log = KvEventLog()
    planner, kv = BatchPlanner(limits, FcfsPolicy(), events=log), SimulatedKv(4, random.Random(0), eos_rate=0)
    first = make_request(0, 22, 2)
    serve_one(planner, first, kv, log)
    (stored,) = [e.stored for b in drain(log, 0) for e in b.events]
    # 22 prompt tokens + the first output computed: 5 full blocks, chained from no parent.
    assert not stored.HasField("parent_block_hash")
    assert [list(b.token_ids) for b in stored.blocks] == [first.prompt_token_ids[i:i + 4] for i in range(0, 20, 4)]
    assert [b.block_hash for b in stored.blocks] == first.block_hashes[:5]
    seen = log.newest

    again = make_request(1, 22, 1)
    again.prompt_token_ids = list(first.prompt_token_ids)
    serve_one(planner, again, kv, log)
    assert again.num_cached_prompt_tokens == 20
    assert all(not e.HasField("stored") for b in drain(log, seen) for e in b.events), "a hit re-stored its blocks"
    seen = log.newest

    evicting = make_request(2, 40, 2)  # 11 blocks of a 12-block cache: the least recently freed go first
    serve_one(planner, evicting, kv, log)
    removed = [h for b in drain(log, seen) for e in b.events if e.HasField("removed") for h in e.removed.block_hashes]
    assert removed and set(removed) <= set(first.block_hashes[:5])
    assert set(removed) == set(first.block_hashes[:5]) - set(planner.allocator.indexed())


def test_a_cache_salt_keys_blocks_apart_and_is_published() -> None:
    limits = PlannerLimits(max_num_batched_tokens=256, max_num_seqs=4, max_model_len=512, block_size=4, num_kv_blocks=64)
    log = KvEventLog()
    planner, kv = BatchPlanner(limits, FcfsPolicy(), events=log), SimulatedKv(4, random.Random(0), eos_rate=0)
    salted = make_request(0, 22, 1, tenant="t")
    salted.cache_salt = "s1"
    serve_one(planner, salted, kv, log)
    other = make_request(1, 22, 1, tenant="t")
    other.prompt_token_ids, other.cache_salt = list(salted.prompt_token_ids), "s2"
    serve_one(planner, other, kv, log)
    same = make_request(2, 22, 1, tenant="t")
    same.prompt_token_ids, same.cache_salt = list(salted.prompt_token_ids), "s1"
    serve_one(planner, same, kv, log)
    assert (other.num_cached_prompt_tokens, same.num_cached_prompt_tokens) == (0, 20)
    stored = [e.stored for b in drain(log, 0) for e in b.events if e.HasField("stored")]
    assert [(s.cache_salt, s.tenant) for s in stored] == [("s1", "t"), ("s2", "t")]


def test_resuming_gets_the_batches_after_the_cursor_and_an_unreachable_cursor_is_refused() -> None:
    log = KvEventLog(max_batches=3)
    for key in range(1, 6):
        log.removed(key)
        log.publish()
    assert log.newest == 5
    assert [b.sequence_number for b in drain(log, 2)] == [3, 4, 5]
    assert [list(b.events[0].removed.block_hashes) for b in drain(log, 3)] == [[4], [5]]
    for cursor in (1, 6):  # batch 2 is gone; batch 6 does not exist yet
        with pytest.raises(CursorExpired):
            drain(log, cursor)
    # 0 asks for the whole history, which no longer starts at batch 1: live batches only.
    async def first_live() -> scheduler_pb2.KvEventBatch:
        subscription = log.subscribe(0)
        assert (await anext(subscription)).load_only  # the load first, at the newest batch: nothing older
        waiting = asyncio.ensure_future(anext(subscription))
        await asyncio.sleep(0)
        assert not waiting.done()
        log.removed(99)
        log.publish()
        return await asyncio.wait_for(waiting, 5)
    assert asyncio.run(first_live()).sequence_number == 6


def test_a_subscriber_that_falls_behind_the_history_is_told_so() -> None:
    log = KvEventLog(max_batches=2)
    log.cleared()
    log.publish()

    async def fall_behind() -> list[int]:
        seen = []
        subscription = log.subscribe(0)
        with pytest.raises(CursorExpired):
            async for batch in subscription:
                if batch.load_only:
                    continue
                seen.append(batch.sequence_number)
                for key in range(3):  # three batches published while the subscriber handles one
                    log.removed(key)
                    log.publish()
        return seen
    assert asyncio.run(fall_behind()) == [1]


def test_cleared_drops_what_was_recorded_but_not_published() -> None:
    log = KvEventLog()
    log.removed(1)
    log.cleared()
    log.publish()
    (batch,) = drain(log, 0)
    assert [e.WhichOneof("data") for e in batch.events] == ["cleared"]


def test_a_cursor_from_before_this_logs_first_batch_is_refused_with_what_to_do() -> None:
    log = KvEventLog(first_sequence=1000)
    log.cleared()
    log.publish()
    with pytest.raises(CursorExpired, match="resubscribe with 0"):
        drain(log, 500)
    assert [b.sequence_number for b in drain(log, 0)] == [1000]


def test_load_records_come_between_batches_when_the_load_changes_and_as_a_heartbeat() -> None:
    log = KvEventLog()
    log.cleared()
    log.publish()

    async def follow() -> list[tuple[int, bool, int]]:
        seen = []
        subscription = log.subscribe(0, heartbeat_seconds=0.2)
        for _ in range(2):  # the history's batch, then the load as it stands
            batch = await anext(subscription)
            seen.append((batch.sequence_number, batch.load_only, batch.load.running_requests))
        assert log.subscribers == 1
        log.set_load(scheduler_pb2.EngineLoad(running_requests=3))  # changed, with no KV event
        batch = await asyncio.wait_for(anext(subscription), 5)
        seen.append((batch.sequence_number, batch.load_only, batch.load.running_requests))
        log.removed(7)
        log.publish()  # a batch carries the load too
        batch = await asyncio.wait_for(anext(subscription), 5)
        seen.append((batch.sequence_number, batch.load_only, batch.load.running_requests))
        started = time.monotonic()
        batch = await asyncio.wait_for(anext(subscription), 5)  # nothing happens: a heartbeat
        seen.append((batch.sequence_number, batch.load_only, batch.load.running_requests))
        assert time.monotonic() - started >= 0.15
        await subscription.aclose()
        assert log.subscribers == 0
        return seen

    assert asyncio.run(follow()) == [(1, False, 0), (1, True, 0), (1, True, 3), (2, False, 3), (2, True, 3)]


def test_the_load_counts_a_prefill_under_way_until_its_first_token() -> None:
    """A router reading prefill_pending_tokens sees a replica busy with a long prompt, not only its queue."""
    planner = BatchPlanner(PlannerLimits(max_num_batched_tokens=32, max_num_seqs=4, max_model_len=256, block_size=4,
                                         num_kv_blocks=64), FcfsPolicy())
    planner.add(make_request(0, 80, 2))
    planner.add(make_request(1, 20, 2))
    assert engine_load(planner).prefill_pending_tokens == 100  # both waiting
    step = planner.schedule()  # the budget takes 32 of the first prompt's 80 tokens
    apply(planner, step, {c.request.slot_id: 7 for c in step.sequences() if c.sample})
    load = engine_load(planner)
    assert load.running_requests == 1 and load.waiting_requests == 1
    assert load.prefill_pending_tokens == 48 + 20  # the prompt under way still counts what is left of it
    first = planner.running[0]
    while not first.output_token_ids:
        step = planner.schedule()
        apply(planner, step, {c.request.slot_id: 7 for c in step.sequences() if c.sample})
    second = next(r for r in list(planner.running) + list(planner.waiting) if r is not first)
    pending = 0 if second.output_token_ids else len(second.prompt_token_ids) - second.num_computed_tokens
    assert engine_load(planner).prefill_pending_tokens == pending  # the first prompt no longer counts
