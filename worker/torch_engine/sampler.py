"""Token sampling on the worker: greedy, temperature, top-k and top-p.

Each random draw uses a generator seeded from (request seed, position of the token), so
a sequence's tokens depend neither on the rest of the batch nor on preemptions.
"""

from __future__ import annotations

import torch

from worker.step import Admission

_MIX = 0x9E3779B97F4A7C15


def draw_seed(seed: int, position: int) -> int:
    return (seed * _MIX + position * 0xBF58476D1CE4E5B9 + 1) % (2**63 - 1)


def sample(logits: torch.Tensor, params: list[Admission], positions: list[int]) -> tuple[list[int], list[float]]:
    """One token per row of logits [S, V] (float32), with its log-probability under the model."""
    logprobs = torch.log_softmax(logits, dim=-1)
    tokens = torch.argmax(logits, dim=-1)
    for row, (param, position) in enumerate(zip(params, positions)):
        if param.temperature > 0 and param.top_k != 1:
            tokens[row] = _sample_row(logits[row], param, draw_seed(param.seed, position))
    chosen = logprobs.gather(1, tokens[:, None]).squeeze(1)
    return tokens.tolist(), chosen.tolist()


def _sample_row(logits: torch.Tensor, param: Admission, seed: int) -> torch.Tensor:
    scaled = logits / param.temperature
    if 0 < param.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, param.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if 0 < param.top_p < 1:
        sorted_logits, order = torch.sort(scaled, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        remove = cumulative - torch.softmax(sorted_logits, dim=-1) >= param.top_p
        scaled = scaled.scatter(0, order, sorted_logits.masked_fill(remove, float("-inf")))
    probs = torch.softmax(scaled, dim=-1)
    generator = torch.Generator(device=logits.device).manual_seed(seed)
    return torch.multinomial(probs, 1, generator=generator)[0]
