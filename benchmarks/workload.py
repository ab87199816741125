"""Benchmark workloads: prompts of exact token lengths, output lengths, and arrival times.

Prompts are made of vocabulary entries that are one space-prefixed lowercase word each, so a
prompt of n such words tokenizes to exactly n tokens (byte-level BPE splits on spaces first).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

_WORD = re.compile(r"^Ġ[a-z]{3,9}$")


@dataclass(frozen=True)
class RequestSpec:
    prompt: str
    prompt_tokens: int
    output_tokens: int
    arrival: float  # seconds after the start; 0 for closed-loop (fixed concurrency) runs


@dataclass(frozen=True)
class Workload:
    name: str
    requests: list[RequestSpec]
    concurrency: int = 0       # closed loop: this many in flight at once
    request_rate: float = 0.0  # open loop: Poisson arrivals at this rate (requests/s)

    @property
    def offered(self) -> str:
        return f"concurrency {self.concurrency}" if self.concurrency else f"{self.request_rate:g} req/s"


class PromptMaker:
    def __init__(self, tokenizer: Tokenizer, seed: int, below: int | None = None) -> None:
        """below: use only tokens with smaller ids (a random model whose vocabulary is smaller than the tokenizer's)."""
        vocab = tokenizer.get_vocab()
        self.words = sorted(token[1:] for token, token_id in vocab.items()
                            if _WORD.match(token) and (below is None or token_id < below))
        self.rng = np.random.default_rng(seed)
        self.tokenizer = tokenizer

    def make(self, num_tokens: int) -> str:
        picks = self.rng.integers(0, len(self.words), num_tokens)
        return "".join(" " + self.words[i] for i in picks)


def fixed_lengths(maker: PromptMaker, count: int, prompt_tokens: int, output_tokens: int) -> list[RequestSpec]:
    return [RequestSpec(maker.make(prompt_tokens), prompt_tokens, output_tokens, 0.0) for _ in range(count)]


def chat_like(maker: PromptMaker, count: int, scale: float, max_prompt: int, max_output: int) -> list[RequestSpec]:
    """Log-normal lengths with means near ShareGPT's (about 220 prompt, 190 output tokens), times scale."""
    rng = maker.rng
    sigma = 0.8
    prompts = rng.lognormal(np.log(220 * scale) - sigma**2 / 2, sigma, count)
    outputs = rng.lognormal(np.log(190 * scale) - sigma**2 / 2, sigma, count)
    return [RequestSpec(maker.make(int(np.clip(p, 4, max_prompt))), int(np.clip(p, 4, max_prompt)),
                        int(np.clip(o, 2, max_output)), 0.0) for p, o in zip(prompts, outputs)]


def with_poisson_arrivals(requests: list[RequestSpec], rate: float, seed: int) -> list[RequestSpec]:
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, len(requests))
    times = np.cumsum(gaps) - gaps[0]
    return [RequestSpec(r.prompt, r.prompt_tokens, r.output_tokens, float(t)) for r, t in zip(requests, times)]
