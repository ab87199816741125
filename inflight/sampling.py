"""Sampling parameters with every default resolved: greedy, no truncation, no penalties.

The public API leaves fields unset; the gateway resolves them here, once. Inside the stack a value is
what it says: the scheduler refuses parameters out of range (among them a top_p or repetition_penalty
of 0, which is what proto3 sends for a field nobody set), and the worker takes them as sent.
"""

from __future__ import annotations

import math
from typing import Protocol

from inflight.v1 import common_pb2

DEFAULTS: dict[str, float | int] = {
    "temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0,
    "presence_penalty": 0.0, "frequency_penalty": 0.0, "min_tokens": 0, "top_logprobs": 0,
}
MAX_TOP_LOGPROBS = 20


def resolved(**given: float | int) -> common_pb2.SamplingParams:
    """DEFAULTS with the given fields (and seed, when given) in their place."""
    return common_pb2.SamplingParams(**{**DEFAULTS, **given})


class SamplingFields(Protocol):
    """What out_of_range reads: a SamplingParams message, or the worker's Admission."""

    temperature: float
    top_p: float
    min_p: float
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    top_logprobs: int


def out_of_range(params: SamplingFields) -> tuple[str, str] | None:
    """(field, what it must be) for the first field out of range, or None: the same rules at the gateway,
    the scheduler and the worker."""
    if not (math.isfinite(params.temperature) and params.temperature >= 0):
        return "temperature", "must be a finite number >= 0"
    if not 0 < params.top_p <= 1:
        return "top_p", "must lie in (0, 1]"
    if not 0 <= params.min_p <= 1:
        return "min_p", "must lie in [0, 1]"
    if not 0 < params.repetition_penalty <= 10:
        return "repetition_penalty", "must lie in (0, 10]"
    for name in ("presence_penalty", "frequency_penalty"):
        if not -2 <= getattr(params, name) <= 2:  # NaN is in no range
            return name, "must lie in [-2, 2]"
    if params.top_logprobs > MAX_TOP_LOGPROBS:
        return "top_logprobs", f"at most {MAX_TOP_LOGPROBS}"
    return None
