"""Serving metrics as vLLM's serving benchmark defines them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from benchmarks.loadgen import RequestRecord


@dataclass(frozen=True)
class Slo:
    ttft_seconds: float
    tpot_seconds: float


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}
    array = np.asarray(values) * 1000.0
    return {"mean": float(array.mean()), "p50": float(np.percentile(array, 50)),
            "p90": float(np.percentile(array, 90)), "p99": float(np.percentile(array, 99))}


def summarize(records: list[RequestRecord], duration: float, slo: Slo) -> dict[str, object]:
    done = [r for r in records if r.ok and r.token_times]
    output_tokens = sum(r.output_tokens for r in done)
    good = [r for r in done if r.ttft <= slo.ttft_seconds and r.tpot <= slo.tpot_seconds]
    return {
        "requests": len(records),
        "completed": len(done),
        "failed": len(records) - len(done),
        "duration_s": duration,
        "request_throughput_rps": len(done) / duration,
        "output_throughput_tps": output_tokens / duration,
        "total_token_throughput_tps": (output_tokens + sum(r.prompt_tokens for r in done)) / duration,
        "goodput_rps": len(good) / duration,
        "slo": {"ttft_ms": slo.ttft_seconds * 1000, "tpot_ms": slo.tpot_seconds * 1000},
        "ttft_ms": _stats([r.ttft for r in done]),
        "tpot_ms": _stats([r.tpot for r in done if r.output_tokens > 1]),
        "itl_ms": _stats([gap for r in done for gap in r.itls]),
        "e2e_ms": _stats([r.e2e for r in done]),
    }
