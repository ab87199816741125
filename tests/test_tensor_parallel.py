"""Tensor-parallel worker groups: the same greedy tokens at any TP size, one failure domain."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from inflight.v1 import generation_pb2
from tests.processes import alive, worker_ranks
from tests.stack import ServedStack
from tests.tiny_models import save_tiny_gqa

PROMPTS = [
    "What is the capital of France?",
    "Write a limerick about a cat who learned to code.",
    "Explain photosynthesis to a ten year old, in a few sentences.",
    "Give three reasons to learn a second language.",
]


def greedy(stack: ServedStack, prompts: list[str], max_tokens: int = 32) -> list[list[int]]:
    def one(text: str) -> list[int]:
        request = generation_pb2.GenerateRequest(max_tokens=max_tokens, ignore_eos=True)
        request.messages.add(role="user", content=text)
        return stack.client.complete(request, timeout=300).token_ids

    with ThreadPoolExecutor(len(prompts)) as pool:  # batched, as a real load would be
        return list(pool.map(one, prompts))


@pytest.fixture(scope="module")
def random_gqa_model(model_dir, tmp_path_factory):
    """A 2-layer Llama with 8 heads and 2 KV heads (replicated at tp=4), with SmolLM2's tokenizer."""
    return save_tiny_gqa(tmp_path_factory.mktemp("tiny-gqa"), model_dir)


@pytest.mark.slow
def test_smollm2_at_tp3_gives_the_tokens_of_tp1(stack):
    """With overlap scheduling on at TP=3 (every rank launches a step before reading the one before it)."""
    expected = greedy(stack, PROMPTS)
    tp3 = ServedStack("--tp", "3", "--num-kv-blocks", "128", "--max-num-batched-tokens", "256",
                      "--overlap", "on").wait_ready()
    try:
        assert greedy(tp3, PROMPTS) == expected
        assert tp3.wait_idle().kv_blocks_free == 127
    finally:
        assert tp3.stop() == 0


@pytest.mark.slow
def test_random_llama_at_tp2_and_tp4_with_kv_head_replication_gives_the_tokens_of_tp1(random_gqa_model):
    # The host-list path: mpiexec -host places the ranks on the hosts named (this one, under two names).
    host_list = ("--mpi-hosts", f"localhost:1,{socket.gethostname()}:1")
    runs = {"tp1": (1, ()), "tp2": (2, ()), "tp4": (4, ("--overlap", "on")), "tp2 on a host list": (2, host_list)}
    tokens = {}
    for name, (tp, flags) in runs.items():
        served = ServedStack("--model", str(random_gqa_model), "--tp", str(tp), "--num-kv-blocks", "64",
                             "--max-model-len", "1024", *flags).wait_ready()
        try:
            tokens[name] = greedy(served, PROMPTS, max_tokens=48)
        finally:
            assert served.stop() == 0
    assert all(len(t) == 48 for t in tokens["tp1"])
    assert tokens["tp2"] == tokens["tp4"] == tokens["tp2 on a host list"] == tokens["tp1"]


def worker_restarts(served: ServedStack) -> int:
    """The scheduler's count of worker groups lost and replaced (0 while it cannot answer)."""
    try:
        return served.stats().worker_restarts
    except grpc.RpcError:  # UNAVAILABLE while it reconnects
        return 0


@pytest.mark.slow
def test_killing_one_rank_fails_inflight_requests_and_the_group_comes_back():
    served = ServedStack("--tp", "3", "--num-kv-blocks", "128").wait_ready()
    try:
        ranks = worker_ranks(served.process.pid)
        assert sorted(ranks) == [0, 1, 2]
        request = generation_pb2.GenerateRequest(max_tokens=1500, ignore_eos=True)
        request.messages.add(role="user", content="Tell me an endless story.")
        outcome: dict[str, object] = {}
        started = threading.Event()

        def consume() -> None:
            try:
                for _ in served.client.stream(request, timeout=120):
                    started.set()
            except grpc.RpcError as error:
                outcome["code"] = error.code()
                outcome["at"] = time.monotonic()

        reader = threading.Thread(target=consume)
        reader.start()
        assert started.wait(60)
        killed_at = time.monotonic()
        os.kill(ranks[1], signal.SIGKILL)
        reader.join(60)
        assert outcome.get("code") == grpc.StatusCode.UNAVAILABLE
        assert outcome["at"] - killed_at < 15  # type: ignore[operator]

        deadline = time.monotonic() + 15
        while any(alive(pid) for pid in ranks.values()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(alive(pid) for pid in ranks.values()), "a rank of the dead group is still running"

        # The launcher starts a new group. Readiness may still read SERVING for a moment after the old
        # group died (the scheduler's report reaches the gateway asynchronously), so wait for the new ranks.
        deadline = time.monotonic() + 180
        while sorted(new_ranks := worker_ranks(served.process.pid)) != [0, 1, 2] and time.monotonic() < deadline:
            time.sleep(0.3)
        while worker_restarts(served) < 1 and time.monotonic() < deadline:  # the scheduler reconnected
            time.sleep(0.3)
        served.wait_ready(timeout=180)
        assert sorted(new_ranks) == [0, 1, 2] and not set(new_ranks.values()) & set(ranks.values())
        again = generation_pb2.GenerateRequest(max_tokens=8)
        again.messages.add(role="user", content="What is the capital of France?")
        assert served.client.complete(again, timeout=120).finish_reason
        assert served.wait_idle().kv_blocks_free == 127
    finally:
        assert served.stop() == 0
    assert not any(alive(pid) for pid in worker_ranks(served.process.pid).values())


@pytest.mark.slow
def test_query_heads_not_divisible_by_tp_is_a_clear_startup_error():
    served = ServedStack("--tp", "2")
    assert served.process.wait(60) != 0
    assert "9 attention heads cannot be split across tp=2 ranks" in served.log_tail()
    served.stop()
