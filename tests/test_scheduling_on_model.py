"""Preemption, chunked prefill and prefix caching on the real model change no token."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from inflight.v1 import generation_pb2
from tests.stack import ServedStack
from tests.test_equivalence import reference_tokens

TOPICS = ["the moon", "volcanoes", "chess", "bread", "rivers", "jazz", "glaciers", "bees", "comets", "tea",
          "bridges", "owls", "deserts", "violins", "coral reefs", "trains"]
LONG_DOCUMENT = " ".join(
    f"Section {i}: the committee reviewed the quarterly figures for region {i % 7}, noted that shipping "
    f"costs rose while staffing held steady, and asked the analysts for a revised forecast." for i in range(18)
)


def chat(text: str, max_tokens: int) -> generation_pb2.GenerateRequest:
    request = generation_pb2.GenerateRequest(max_tokens=max_tokens, ignore_eos=True)
    request.messages.add(role="user", content=text)
    return request


@pytest.fixture(scope="module")
def small_cache_stack(model_dir):
    """47 usable blocks of 16 tokens and a 128-token step budget: 16 requests cannot all fit."""
    served = ServedStack("--num-kv-blocks", "48", "--max-num-batched-tokens", "128").wait_ready()
    yield served
    assert served.stop() == 0


@pytest.mark.slow
def test_preempted_requests_resume_with_identical_tokens_and_free_every_block(small_cache_stack):
    stack = small_cache_stack
    requests = [chat(f"Write a few sentences about {topic}.", 48) for topic in TOPICS]
    solo = [stack.client.complete(r, timeout=120).token_ids for r in requests]
    before = stack.stats().preemptions_total
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda r: stack.client.complete(r, timeout=600).token_ids, requests))
    after = stack.wait_idle()
    assert after.preemptions_total > before
    assert together == solo
    assert after.kv_blocks_free == after.kv_blocks_total  # cached-but-free blocks count as free
    assert after.requests_running == 0 and after.requests_waiting == 0


@pytest.mark.slow
def test_prompt_longer_than_the_step_budget_is_prefilled_in_chunks_with_unchunked_tokens(small_cache_stack, hf_reference):
    text = f"Summarise this report in one sentence.\n\n{LONG_DOCUMENT[:2000]}"
    prompt_ids, expected = reference_tokens(hf_reference, "chat", text)
    assert len(prompt_ids) > 3 * 128  # at least four chunks under a 128-token budget
    before = small_cache_stack.stats().steps_total
    result = small_cache_stack.client.complete(chat(text, len(expected)), timeout=300)
    steps = small_cache_stack.stats().steps_total - before
    assert result.token_ids == expected
    assert steps >= 40 - 1 + len(prompt_ids) // 128  # the prompt took several steps


@pytest.mark.slow
def test_a_shared_prefix_is_reused_and_gives_the_tokens_of_a_cold_run(stack, hf_reference):
    questions = ["Which region is mentioned first?", "What did the committee ask for?"]
    texts = [f"{LONG_DOCUMENT}\n\nQuestion: {q}" for q in questions]
    before = stack.stats().prefix_cache_hit_tokens_total
    first = stack.client.complete(chat(texts[0], 32), timeout=300)
    second = stack.client.complete(chat(texts[1], 32), timeout=300)
    prompt_ids, expected = reference_tokens(hf_reference, "chat", texts[1])
    shared = next(i for i, (a, b) in enumerate(zip(*(reference_tokens(hf_reference, "chat", t)[0] for t in texts))) if a != b)
    # The first may hit only blocks that other chats left (the chat template's system prompt).
    assert first.usage.cached_prompt_tokens <= 32 < shared
    assert second.usage.cached_prompt_tokens == shared // 16 * 16  # every full block of the common prefix
    assert stack.stats().prefix_cache_hit_tokens_total - before >= second.usage.cached_prompt_tokens
    assert second.token_ids == expected[:32]
