"""The sampler's definitions, checked against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from worker.step import Admission
from worker.torch_engine.sampler import SequenceSampling, sample


def params(**fields) -> Admission:
    base = dict(request_id="", slot_id=0, temperature=0.0, top_p=1.0, top_k=0, seed=1)
    return Admission(**{**base, **fields})


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    logits = torch.tensor([[2.0, 1.9, -1.0, -0.5]])
    # Token 0 was seen: 2.0 / 4 = 0.5 < 1.9, so greedy moves to token 1.
    seq = SequenceSampling(params(repetition_penalty=4.0, num_prompt_tokens=1), history=[0])
    assert sample(logits, [seq], [1]).result().token_ids == [1]
    seen_negative = SequenceSampling(params(repetition_penalty=4.0, num_prompt_tokens=2), history=[0, 1])
    # 0.5, 0.475, then -1.0 and -0.5 untouched: token 0 still wins.
    assert sample(logits, [seen_negative], [2]).result().token_ids == [0]


def test_presence_and_frequency_penalties_subtract_per_generated_token():
    logits = torch.tensor([[3.0, 2.5, 0.0]])
    # Prompt token 0 is not penalised (presence/frequency count only generated tokens).
    prompt_only = SequenceSampling(params(presence_penalty=1.0, num_prompt_tokens=1), history=[0])
    assert sample(logits, [prompt_only], [1]).result().token_ids == [0]
    # Generated twice: 3.0 - 2 * 0.3 - 0.0 = 2.4 < 2.5.
    generated = SequenceSampling(params(frequency_penalty=0.3, num_prompt_tokens=1), history=[2, 0, 0])
    assert sample(logits, [generated], [3]).result().token_ids == [1]


def test_min_tokens_masks_stop_tokens_until_reached():
    logits = torch.tensor([[5.0, 1.0, 0.0]])
    early = SequenceSampling(params(min_tokens=2, num_prompt_tokens=4, stop_token_ids=[0]))
    assert sample(logits, [early], [5]).result().token_ids == [1]  # one generated so far
    late = SequenceSampling(params(min_tokens=2, num_prompt_tokens=4, stop_token_ids=[0]))
    assert sample(logits, [late], [6]).result().token_ids == [0]


def test_logprobs_are_the_models_not_the_penalised_ones():
    logits = torch.tensor([[2.0, 1.0, 0.5]])
    seq = SequenceSampling(params(repetition_penalty=10.0, top_logprobs=2, num_prompt_tokens=1), history=[0])
    result = sample(logits, [seq], [1]).result()
    reference = torch.log_softmax(logits, dim=-1)[0]
    assert result.token_ids == [1]
    assert math.isclose(result.logprobs[0], reference[1].item(), rel_tol=1e-6)
    assert result.top_token_ids == [[0, 1]]


def test_top_p_min_p_and_top_k_restrict_the_candidates():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = lambda **f: {sample(logits, [SequenceSampling(params(temperature=1.0, seed=s, **f))], [s]).result().token_ids[0]  # noqa: E731
                         for s in range(300)}
    assert draws() == {0, 1, 2, 3}
    assert draws(top_p=0.75) == {0, 1}       # 0.5 + 0.3 reaches 0.75
    assert draws(min_p=0.25) == {0, 1, 2}    # 0.05 < 0.25 * 0.5
    assert draws(top_k=1) == {0}
    assert draws(top_k=3) == {0, 1, 2}


def test_same_seed_and_position_give_the_same_draw_whatever_the_batch():
    logits = torch.randn(3, 100)
    alone = sample(logits[1:2], [SequenceSampling(params(temperature=1.0, seed=9))], [17]).result().token_ids
    batched = sample(logits, [SequenceSampling(params(temperature=1.0, seed=s)) for s in (3, 9, 4)], [5, 17, 8]).result().token_ids
    assert batched[1] == alone[0]


def test_temperatures_too_small_to_divide_by_are_greedy():
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    for temperature in (1e-38, 9.99995e-41, 1e-45, 1e-6):
        result = sample(logits, [SequenceSampling(params(temperature=temperature, seed=3))], [4]).result()
        assert result.token_ids == [1] and result.failures == {}


def test_a_row_of_non_finite_logits_fails_that_sequence_alone():
    logits = torch.tensor([[1.0, 3.0, 2.0], [float("nan"), 1.0, 0.0], [0.5, 0.1, 2.0]])
    sequences = [SequenceSampling(params(temperature=t, seed=1, top_logprobs=2)) for t in (0.0, 0.0, 0.7)]
    result = sample(logits, sequences, [4, 4, 4]).result()
    assert set(result.failures) == {1} and not result.failures[1].invalid_argument
    healthy = sample(logits[[0, 2]], [sequences[0], sequences[2]], [4, 4]).result()
    assert [result.token_ids[0], result.token_ids[2]] == healthy.token_ids
    assert [result.logprobs[0], result.logprobs[2]] == healthy.logprobs


@pytest.mark.parametrize("fields", [{"temperature": float("nan")}, {"top_p": 0.0}, {"repetition_penalty": 0.0},
                                    {"min_p": 1.5}, {"presence_penalty": float("inf")}])
def test_parameters_out_of_range_fail_that_sequence_alone(fields):
    """The gateway's rules (inflight.sampling); a top_p or repetition penalty of 0 is never read as unset."""
    logits = torch.tensor([[1.0, 3.0, 2.0], [1.0, 3.0, 2.0]])
    poisoned = SequenceSampling(params(seed=1, **fields))
    result = sample(logits, [SequenceSampling(params()), poisoned], [4, 4]).result()
    assert result.token_ids[0] == 1
    assert set(result.failures) == {1} and result.failures[1].invalid_argument
    assert next(iter(fields)) in result.failures[1].message
