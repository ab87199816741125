"""The decode yardstick (benchmarks/reference_decoder.py) computes the engine's model: CPU, float32."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from benchmarks import reference_check as check
from benchmarks.reference_decoder import ReferenceLlama, load_reference
from worker.torch_engine.engine import load_weights


def _distinct_tokens(tokens: list[list[int]]) -> int:
    return len({token for sequence in tokens for token in sequence})


def test_reference_greedy_tokens_and_logits_equal_the_engines() -> None:
    result = check.compare("random:tiny-gqa")
    assert result.engine_tokens == result.reference_tokens
    assert [len(tokens) for tokens in result.reference_tokens] == [check.NEW_TOKENS] * len(check.PROMPT_LENGTHS)
    assert result.max_abs_logit_diff <= check.TOLERANCE
    # A model that repeats one token would prove little.
    assert _distinct_tokens(result.reference_tokens) > check.NEW_TOKENS


def test_llama3_rope_scaling_and_a_tied_head_equal_the_engines(tmp_path: Path) -> None:
    result = check.compare(check.save_scaled_tied_model(tmp_path))
    assert result.engine_tokens == result.reference_tokens
    assert result.max_abs_logit_diff <= check.TOLERANCE
    assert _distinct_tokens(result.reference_tokens) > check.NEW_TOKENS


def test_a_reference_without_the_rope_scaling_is_caught(tmp_path: Path) -> None:
    """The check has teeth: drop the scaling (which the engine applies) and the logits part ways."""
    model = check.save_scaled_tied_model(tmp_path)
    config, weights = load_weights(model, torch.device("cpu"), torch.float32, 0)
    prompts = check.check_prompts(config.vocab_size)
    unscaled = ReferenceLlama(dataclasses.replace(config, rope_scaling=None), weights, torch.device("cpu"),
                              torch.float32, len(prompts), max(check.PROMPT_LENGTHS) + check.NEW_TOKENS)
    wrong = check.reference_greedy(unscaled, prompts, check.NEW_TOKENS)
    assert check.max_abs_diff(wrong, check.engine_greedy(model, prompts, check.NEW_TOKENS)) > 100 * check.TOLERANCE


def test_decode_traces_as_one_graph_that_matches_eager() -> None:
    """fullgraph=True: no graph break (CUDA graphs need one graph); aot_eager keeps CI free of codegen."""
    cpu = torch.device("cpu")
    eager, traced = (load_reference("random:tiny-gqa", 0, cpu, torch.float32, 3, 64) for _ in range(2))
    compiled = torch.compile(traced.decode, backend="aot_eager", fullgraph=True)
    prompt = torch.arange(3, 33).view(3, 10)
    positions = torch.tensor([10, 11, 12])  # each row at its own position (11, 12: over unwritten keys)
    with torch.inference_mode():
        tokens = eager.prefill(prompt).argmax(dim=-1)
        traced.prefill(prompt)
        for step in range(3):
            expected = eager.decode(tokens, positions + step)
            torch.testing.assert_close(compiled(tokens, positions + step), expected, rtol=0, atol=1e-5)
            tokens = expected.argmax(dim=-1)
    torch.testing.assert_close(traced.cache, eager.cache, rtol=0, atol=1e-5)
