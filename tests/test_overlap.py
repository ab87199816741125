"""Overlap scheduling on the real model: the same tokens with it on and off, whatever ends a request.

Stacks with a cache too small for the load (so requests are preempted and resumed), with overlap
scheduling on (two steps in flight; on CPU it is off unless asked for), with three steps in flight,
and with it off,
serve the same concurrent mix: greedy
and seeded sampling, stop strings, stop token ids with min_tokens, penalties, log-probabilities, and
max_tokens ends, while other requests of the same kind are cancelled mid-stream.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from inflight.v1 import generation_pb2
from services.client import Completion
from tests.stack import ServedStack

TOPICS = ["the moon", "volcanoes", "chess", "bread", "rivers", "jazz", "glaciers", "bees", "comets", "tea",
          "bridges", "owls", "deserts", "violins"]


def request(index: int) -> generation_pb2.GenerateRequest:
    kind = index % 6
    r = generation_pb2.GenerateRequest(max_tokens=20 + 3 * index, request_id=f"overlap-{index}")
    r.messages.add(role="user", content=f"Write a few sentences about {TOPICS[index % len(TOPICS)]}.")
    if kind == 1:
        r.temperature, r.top_p, r.seed = 0.9, 0.9, 1000 + index
    elif kind == 2:
        r.stop.extend([".", "!"])
    elif kind == 3:
        r.stop_token_ids.extend([13, 30])  # common punctuation ids of SmolLM2's vocabulary
        r.min_tokens = 6
    elif kind == 4:
        r.temperature, r.seed = 0.7, 2000 + index
        r.repetition_penalty, r.presence_penalty, r.frequency_penalty = 1.3, 0.4, 0.2
    elif kind == 5:
        r.top_logprobs = 3
        r.ignore_eos = True
    return r


def outcome(completion: Completion) -> tuple:
    logprobs = [(lp.token_id, lp.logprob, tuple(lp.top_token_ids)) for lp in completion.logprobs]
    return (completion.token_ids, completion.text, completion.finish_reason, logprobs)


def same(a: tuple, b: tuple) -> bool:
    """Equal outcomes; log-probabilities to float32 noise (batches of other shapes round differently)."""
    return a[:3] == b[:3] and len(a[3]) == len(b[3]) and all(
        x[0] == y[0] and x[2] == y[2] and abs(x[1] - y[1]) < 1e-3 for x, y in zip(a[3], b[3]))


def cancelled_prefix(stack: ServedStack, index: int, after: int) -> list[int]:
    """The tokens a stream received before its client cancelled it."""
    tokens: list[int] = []
    cancelled = request(index)
    cancelled.request_id = f"cancelled-{index}"
    call = stack.client.stream(cancelled, timeout=600)
    for response in call:
        tokens.extend(response.token_ids)
        if len(tokens) >= after:
            call.cancel()
            break
    return tokens


def serve_mix(stack: ServedStack) -> tuple[list[tuple], dict[int, list[int]]]:
    requests = [request(i) for i in range(14)]
    before = stack.stats().preemptions_total
    with ThreadPoolExecutor(len(requests) + 4) as pool:
        cancelled = {i: pool.submit(cancelled_prefix, stack, i, 3 + i) for i in range(4)}
        complete = list(pool.map(lambda r: stack.client.complete(r, timeout=900), requests))
        prefixes = {i: future.result() for i, future in cancelled.items()}
    stats = stack.wait_idle()
    assert stats.preemptions_total > before, "the load was meant to preempt"
    assert stats.requests_running == 0 and stats.requests_waiting == 0
    assert stats.kv_blocks_free == stats.kv_blocks_total  # cached-but-free blocks count as free
    return [outcome(c) for c in complete], prefixes


@pytest.fixture(scope="module")
def stacks(model_dir):
    """The same small cache (31 usable blocks of 16 tokens) and step budget; overlap on and off."""
    flags = ("--num-kv-blocks", "32", "--max-num-batched-tokens", "128")
    served = {"overlap": ServedStack(*flags, "--overlap", "on"),
              "three in flight": ServedStack(*flags, "--overlap", "on", "--steps-in-flight", "3"),
              "no-overlap": ServedStack(*flags, "--overlap", "off")}
    for stack in served.values():
        stack.wait_ready()
    yield served
    for stack in served.values():
        assert stack.stop() == 0


@pytest.mark.slow
def test_overlap_on_and_off_give_identical_tokens_and_free_every_block(stacks):
    results = {name: serve_mix(stack) for name, stack in stacks.items()}
    overlapped, overlapped_prefixes = results["overlap"]
    plain, _ = results["no-overlap"]
    for index, (a, b, c) in enumerate(zip(overlapped, results["three in flight"][0], plain)):
        assert same(a, c) and same(b, c), (index, a, b, c)
    for (tokens, text, finish, logprobs), r in zip(plain, (request(i) for i in range(14))):
        # No token past a request's end: max_tokens is a ceiling, a stop string ends the text.
        assert len(tokens) <= r.max_tokens and finish in ("FINISH_REASON_STOP", "FINISH_REASON_LENGTH")
        if finish == "FINISH_REASON_LENGTH":
            assert len(tokens) == r.max_tokens
        assert not any(s in text for s in r.stop)
        if r.top_logprobs:
            assert len(logprobs) == len(tokens) and all(len(top) == 3 for _, _, top in logprobs)
    for index, prefix in overlapped_prefixes.items():  # a cancelled stream got the start of the full answer
        assert prefix == overlapped[index][0][: len(prefix)] and prefix
