"""MPT (ALiBi) and Mixtral (mixture of experts) served through the whole stack give transformers' greedy tokens.

Tiny checkpoints written by transformers (tests/tiny_models.py), 4 prompts x 32 tokens, batched,
at tp=1 and at tp=2 (which splits the heads, the ALiBi slopes, the KV heads and every expert).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from inflight.v1 import generation_pb2
from services.client import Completion
from services.text.codec import TextCodec
from tests.stack import ServedStack
from tests.tiny_models import load_reference, reference_greedy, save_tiny

PROMPTS = [
    "The history of the printing press begins",
    "Once upon a time, in a village by the sea, there lived",
    "Three reasons to learn a second language are",
    "def fibonacci(n):\n    return",
]
NEW_TOKENS = 32


@pytest.fixture(scope="module", params=["mpt", "mixtral"])
def family(request: pytest.FixtureRequest, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(request.param, tmp_path_factory.mktemp(f"tiny-{request.param}"), model_dir)


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_greedy_tokens_equal_transformers(family: Path, tp: int) -> None:
    encode = TextCodec(family).tokenizer.encode
    reference = load_reference(family)
    expected = [reference_greedy(reference, encode(text).ids, NEW_TOKENS) for text in PROMPTS]
    assert all(len(set(tokens)) >= 4 for tokens in expected), "the tiny model must not repeat one token"

    served = ServedStack("--model", str(family), "--tp", str(tp), "--num-kv-blocks", "64",
                         "--max-model-len", "1024").wait_ready()
    try:
        def complete(text: str) -> Completion:
            request = generation_pb2.GenerateRequest(prompt=text, max_tokens=NEW_TOKENS, ignore_eos=True)
            return served.client.complete(request, timeout=300)

        with ThreadPoolExecutor(len(PROMPTS)) as pool:  # batched, as a real load would be
            completions = list(pool.map(complete, PROMPTS))
        for text, completion, tokens in zip(PROMPTS, completions, expected):
            assert completion.usage.prompt_tokens == len(encode(text).ids)
            assert list(completion.token_ids) == tokens, text
        assert served.wait_idle().kv_blocks_free == 63
    finally:
        assert served.stop() == 0
