"""SubscribeKvEvents on TensorRT-LLM's gRPC service, end to end: a real stack with a small KV cache.

A subscriber (smg-grpc-proto's stubs, as SMG uses them) sees each prompt's full blocks stored with
their token ids, nothing new on a prefix-cache hit, and the blocks an eviction drops; its view
predicts what the next request finds cached.
"""

from __future__ import annotations

import queue
import os
import signal
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from smg_grpc_proto.generated import common_pb2 as smg_common
from smg_grpc_proto.generated import trtllm_service_pb2 as trtllm
from smg_grpc_proto.generated import trtllm_service_pb2_grpc

from tests.processes import stack_processes
from tests.stack import ServedStack

BLOCK = 16
USABLE_BLOCKS = 23
PROMPT_A = [1000 + i for i in range(100)]   # 6 full blocks and a partial one
PROMPT_B = [5000 + i for i in range(300)]   # 19 blocks: more than are free without evicting A's


@pytest.fixture(scope="module")
def small_stack() -> Iterator[ServedStack]:
    served = ServedStack("--num-kv-blocks", str(USABLE_BLOCKS + 1), "--max-num-batched-tokens", "256",
                         "--kv-event-history", "64").wait_ready()
    yield served
    assert served.stop() == 0


@pytest.fixture(scope="module")
def stub(small_stack: ServedStack) -> Iterator[trtllm_service_pb2_grpc.TrtllmServiceStub]:
    with grpc.insecure_channel(small_stack.address) as channel:
        yield trtllm_service_pb2_grpc.TrtllmServiceStub(channel)


class Subscriber:
    """A background SubscribeKvEvents call and the router view rebuilt from it."""

    def __init__(self, stub: trtllm_service_pb2_grpc.TrtllmServiceStub, cursor: int = 0) -> None:
        self.call = stub.SubscribeKvEvents(smg_common.SubscribeKvEventsRequest(start_sequence_number=cursor),
                                           timeout=300)
        self.batches: queue.Queue[smg_common.KvEventBatch] = queue.Queue()
        self.blocks: dict[int, list[int]] = {}
        self.stored: list[int] = []
        self.salts: list[str | None] = []  # per stored event
        self.cleared_in: list[int] = []  # sequence numbers of the batches that cleared the cache
        self.loads: list[smg_common.EngineLoad] = []  # on every batch, and alone between them
        self.ended: grpc.StatusCode | None = None
        self.removed: list[int] = []
        self.sequence_numbers: list[int] = []
        self.from_start = cursor == 0  # else blocks stored before the cursor may be removed
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for batch in self.call:
                self.batches.put(batch)
        except grpc.RpcError as error:
            self.ended = error.code()

    def catch_up(self, seconds: float = 0.5) -> None:
        """Apply what arrived, until no KV event has come for `seconds` (load records come every second)."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                batch = self.batches.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return
            if not batch.load.load_only:
                deadline = time.monotonic() + seconds
            self.loads.append(batch.load)
            if batch.load.load_only:
                assert not batch.events and batch.sequence_number == (self.sequence_numbers or [batch.sequence_number])[-1]
                continue
            self.sequence_numbers.append(batch.sequence_number)
            for event in batch.events:
                kind = event.WhichOneof("data")
                if kind == "cleared":
                    self.cleared_in.append(batch.sequence_number)
                    self.blocks.clear()
                elif kind == "removed":
                    for key in event.removed.block_hashes:
                        self.removed.append(key)
                        assert key in self.blocks or not self.from_start, "a block removed that was never stored"
                        self.blocks.pop(key, None)
                else:
                    self.salts.append(event.stored.cache_salt if event.stored.HasField("cache_salt") else None)
                    for block in event.stored.blocks:
                        assert block.block_size == BLOCK
                        self.stored.append(block.block_hash)
                        self.blocks[block.block_hash] = list(block.token_ids)

    def cached_prefix_tokens(self, prompt: list[int]) -> int:
        """What the view says a prompt will find cached: its leading full blocks that are stored."""
        known = {tuple(tokens) for tokens in self.blocks.values()}
        count = 0
        while (count + 1) * BLOCK < len(prompt) and tuple(prompt[count * BLOCK:(count + 1) * BLOCK]) in known:
            count += 1
        return count * BLOCK


def generate(stub: trtllm_service_pb2_grpc.TrtllmServiceStub, prompt: list[int], request_id: str) -> trtllm.GenerateComplete:
    request = trtllm.GenerateRequest(request_id=request_id, max_tokens=1, streaming=False,
                                     tokenized=trtllm.TokenizedInput(input_token_ids=prompt))
    (response,) = list(stub.Generate(request, timeout=120))
    return response.complete


@pytest.mark.slow
def test_stores_hits_and_evictions_reach_a_subscriber_with_their_token_ids(stub) -> None:
    subscriber = Subscriber(stub)
    subscriber.catch_up()
    # The whole history: a new stack's first batch clears the cache.
    assert subscriber.cleared_in[:1] == subscriber.sequence_numbers[:1] and not subscriber.blocks

    assert generate(stub, PROMPT_A, "a1").cached_tokens == 0
    subscriber.catch_up()
    a_blocks = [PROMPT_A[i:i + BLOCK] for i in range(0, 96, BLOCK)]
    assert sorted(subscriber.blocks.values()) == sorted(a_blocks)
    a_keys = set(subscriber.blocks)

    assert subscriber.cached_prefix_tokens(PROMPT_A) == 96
    assert generate(stub, PROMPT_A, "a2").cached_tokens == 96  # the hit the view predicted
    subscriber.catch_up()
    assert set(subscriber.blocks) == a_keys and len(subscriber.stored) == 6, "a hit stored its blocks again"

    assert generate(stub, PROMPT_B, "b").cached_tokens == 0
    subscriber.catch_up()
    evicted = set(subscriber.removed)
    assert evicted and evicted <= a_keys, "B's blocks evict A's (least recently freed first), nothing else"
    assert sorted(subscriber.blocks[k] for k in a_keys - evicted) == sorted(a_blocks[:6 - len(evicted)])
    assert [PROMPT_B[i:i + BLOCK] for i in range(0, 288, BLOCK)] == \
        [tokens for key, tokens in subscriber.blocks.items() if key not in a_keys]
    # The view still predicts what the cache holds.
    assert generate(stub, PROMPT_A, "a3").cached_tokens == subscriber.cached_prefix_tokens(PROMPT_A) < 96


@pytest.mark.slow
def test_a_resumed_subscription_continues_after_its_cursor(stub) -> None:
    first = Subscriber(stub)
    generate(stub, [2000 + i for i in range(40)], "r1")
    first.catch_up()
    newest = first.sequence_numbers[-1]
    assert first.sequence_numbers == list(range(first.sequence_numbers[0], newest + 1))  # without gaps
    resumed = Subscriber(stub, cursor=newest - 1)
    resumed.catch_up()
    assert resumed.sequence_numbers == [newest]
    generate(stub, [3000 + i for i in range(40)], "r2")
    resumed.catch_up()
    assert resumed.sequence_numbers[0] == newest and resumed.sequence_numbers[1] == newest + 1


@pytest.mark.slow
def test_a_quiet_subscription_answers_its_headers_at_once_and_a_cursor_past_the_newest_is_out_of_range(stub) -> None:
    quiet = Subscriber(stub)
    quiet.catch_up()
    caught_up = stub.SubscribeKvEvents(smg_common.SubscribeKvEventsRequest(
        start_sequence_number=quiet.sequence_numbers[-1]), timeout=30)
    caught_up.initial_metadata()  # routers give up on a subscription whose headers do not come before events
    assert caught_up.is_active(), "the headers came only with the end of the call"
    caught_up.cancel()
    with pytest.raises(grpc.RpcError) as refused:
        list(stub.SubscribeKvEvents(smg_common.SubscribeKvEventsRequest(start_sequence_number=2**62), timeout=30))
    assert refused.value.code() == grpc.StatusCode.OUT_OF_RANGE and "newest" in refused.value.details()


@pytest.mark.slow
def test_fuzzed_cursors_get_a_stream_or_out_of_range_and_nothing_else_is_harmed(small_stack, stub) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    @settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.one_of(st.integers(0, 70), st.integers(0, 2**64 - 1)))
    def check(cursor: int) -> None:
        call = stub.SubscribeKvEvents(smg_common.SubscribeKvEventsRequest(start_sequence_number=cursor), timeout=1)
        try:
            batches = list(call)
        except grpc.RpcError as error:
            assert error.code() in (grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.DEADLINE_EXCEEDED), error.code()
        else:
            pytest.fail(f"the stream ended by itself after {len(batches)} batches")

    check()
    assert generate(stub, PROMPT_A[:40], "after-fuzz").completion_tokens == 1
    idle = small_stack.wait_idle()
    assert idle.kv_blocks_free == idle.kv_blocks_total


@pytest.mark.slow
def test_cache_salt_id_keeps_prefixes_apart_and_is_published_with_the_blocks(stub) -> None:
    subscriber = Subscriber(stub)
    subscriber.catch_up()
    before = len(subscriber.salts)
    prompt = [7000 + i for i in range(40)]

    def cached(salt: int | None, request_id: str) -> int:
        request = trtllm.GenerateRequest(request_id=request_id, max_tokens=1, streaming=False,
                                         tokenized=trtllm.TokenizedInput(input_token_ids=prompt))
        if salt is not None:
            request.cache_salt_id = salt
        (response,) = list(stub.Generate(request, timeout=120))
        return response.complete.cached_tokens

    assert [cached(7, "s1"), cached(7, "s2"), cached(8, "s3"), cached(None, "s4")] == [0, 32, 0, 0]
    subscriber.catch_up()
    assert subscriber.salts[before:] == ["7", "8", None]


@pytest.mark.slow
def test_after_a_scheduler_restart_the_old_cursor_is_out_of_range_and_a_fresh_subscription_starts_cleared(
        small_stack, stub) -> None:
    """Last in this module: it restarts the stack's scheduler."""
    before = Subscriber(stub)
    generate(stub, [9000 + i for i in range(40)], "before-restart")
    before.catch_up()
    cursor = before.sequence_numbers[-1]
    os.kill(stack_processes(small_stack.process.pid)["scheduler"], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while True:  # the launcher starts a new scheduler; the gateway turns SERVING again
        try:
            generate(stub, [9500 + i for i in range(40)], f"after-restart-{time.monotonic()}")
            break
        except grpc.RpcError:
            assert time.monotonic() < deadline, "the stack did not serve again after its scheduler was killed"
            time.sleep(0.5)
    before.catch_up()
    assert before.ended == grpc.StatusCode.UNAVAILABLE  # the old scheduler's stream ended with it
    # The new scheduler numbers its batches above the old one's: a resumed cursor cannot silently continue.
    with pytest.raises(grpc.RpcError) as refused:
        list(stub.SubscribeKvEvents(smg_common.SubscribeKvEventsRequest(start_sequence_number=cursor), timeout=30))
    assert refused.value.code() == grpc.StatusCode.OUT_OF_RANGE and "resubscribe with 0" in refused.value.details()
    fresh = Subscriber(stub)
    fresh.catch_up()
    assert fresh.sequence_numbers[0] > cursor and fresh.cleared_in[:1] == fresh.sequence_numbers[:1]
    assert sorted(fresh.blocks.values()) == [[9500 + i for i in range(j, j + BLOCK)] for j in (0, 16)]


@pytest.mark.slow
def test_load_records_show_a_request_running_and_then_an_idle_engine(stub) -> None:
    subscriber = Subscriber(stub)
    subscriber.catch_up()
    done = threading.Event()

    def long_request() -> None:
        request = trtllm.GenerateRequest(request_id="load", max_tokens=48, streaming=False,
                                         tokenized=trtllm.TokenizedInput(input_token_ids=[4000 + i for i in range(200)]))
        list(stub.Generate(request, timeout=120))
        done.set()

    threading.Thread(target=long_request, daemon=True).start()
    assert done.wait(120)
    subscriber.catch_up(seconds=1.5)  # at least one heartbeat after the request
    busy = [load for load in subscriber.loads if load.running_requests]
    assert busy and max(load.num_used_tokens for load in busy) >= 208 and busy[0].max_running_requests >= 1
    assert all(0 < load.token_usage <= 1 for load in busy)
    last = subscriber.loads[-1]
    assert last.load_only and last.running_requests == 0 and last.waiting_requests == 0 and last.num_used_tokens == 0
    samples = [load.sample for load in subscriber.loads]
    assert samples == sorted(samples) and len(set(samples)) == len(samples)  # ordered, one number each
