"""Continuous batching: concurrent requests share steps and each returns exactly its solo tokens."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from inflight.v1 import generation_pb2

REQUESTS = [
    ("Tell me about the moon.", 24),
    ("What is two plus two?", 16),
    ("Write a haiku about autumn leaves falling slowly to the ground.", 32),
    ("List three colours.", 20),
    ("Why is the sky blue? Answer in one paragraph, please, with some physics.", 40),
    ("Hi", 12),
    ("Describe a cat to someone who has never seen one, mentioning its fur, eyes, tail and habits.", 28),
    ("Name a famous painter.", 36),
    ("What do bees make?", 18),
    ("Give me a tip for learning to cook well at home.", 30),
]


def request_for(text: str, max_tokens: int) -> generation_pb2.GenerateRequest:
    request = generation_pb2.GenerateRequest(max_tokens=max_tokens, ignore_eos=True)
    request.messages.add(role="user", content=text)
    return request


@pytest.mark.slow
def test_concurrent_requests_return_their_solo_tokens_and_share_steps(stack):
    solo_tokens, solo_steps = [], 0
    for text, max_tokens in REQUESTS:
        before = stack.stats().steps_total
        solo_tokens.append(stack.client.complete(request_for(text, max_tokens), timeout=120).token_ids)
        solo_steps += stack.stats().steps_total - before

    before = stack.stats()
    with ThreadPoolExecutor(len(REQUESTS)) as pool:
        futures = [pool.submit(stack.client.complete, request_for(t, n), 300) for t, n in REQUESTS]
        batched_tokens = [f.result().token_ids for f in futures]
    after = stack.wait_idle()

    for (text, max_tokens), solo, batched in zip(REQUESTS, solo_tokens, batched_tokens):
        assert len(solo) == max_tokens
        assert batched == solo, text
    batched_steps = after.steps_total - before.steps_total
    sequences_per_step = (after.batched_sequences_total - before.batched_sequences_total) / batched_steps
    # Alone, the requests needed solo_steps steps; together they must have shared most of them.
    assert batched_steps < solo_steps / 2, (batched_steps, solo_steps)
    assert sequences_per_step > 2.0
    assert after.max_batch_size_seen >= 5
    assert after.kv_blocks_free == after.kv_blocks_total
