"""Programmatic dependent launch (PDL) on a chain of one-row matvecs in a CUDA graph: does it close the gaps?

    python benchmarks/pdl_probe.py

A chain of 64 [1, 4096] x [4096, 4096] matvecs (each reads the one before), in a CUDA graph, timed per call:
plain launches; launched with PDL, waiting on the predecessor first thing; and with PDL, loading the first
weight tile before the wait (weights do not depend on the predecessor).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.graph_timing import graphed_calls_us  # noqa: E402


@triton.jit
def matvec(x_ptr, w_ptr, y_ptr, n, k: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
           PDL: tl.constexpr, EARLY: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    cols = tl.arange(0, BLOCK_K)
    w_first = tl.load(w_ptr + rows.to(tl.int64)[:, None] * k + cols[None, :]) if EARLY else None
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    for start in tl.static_range(0, k, BLOCK_K):
        c = start + cols
        if EARLY and start == 0:
            w = w_first
        else:
            w = tl.load(w_ptr + rows.to(tl.int64)[:, None] * k + c[None, :])
        x = tl.load(x_ptr + c).to(tl.float32)
        acc += w.to(tl.float32) * x[None, :]
    tl.store(y_ptr + rows, (tl.sum(acc, axis=1) * 0.01).to(y_ptr.dtype.element_ty))


def run(pdl: bool, early: bool, weights: list[torch.Tensor], xs: list[torch.Tensor]) -> float:
    """GPU microseconds per matvec of the chain, captured in one CUDA graph."""
    n, k = weights[0].shape
    kwargs = {"launch_pdl": True} if pdl else {}

    def call(i: int) -> None:
        matvec[(n // 16,)](xs[i], weights[i], xs[i + 1], n, k, BLOCK_N=16, BLOCK_K=1024, PDL=pdl, EARLY=early,
                           num_warps=8, num_stages=2, **kwargs)

    return graphed_calls_us([functools.partial(call, i) for i in range(len(weights))], replays=50)


def main() -> None:
    torch.manual_seed(0)
    calls, n, k = 64, 4096, 4096
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(calls)]
    xs = [torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for _ in range(calls + 1)]
    floor_bytes = n * k * 2
    results = {}
    for name, pdl, early in (("plain", False, False), ("pdl", True, False), ("pdl_early", True, True),
                             ("plain_again", False, False)):
        xs[1:] = [torch.zeros_like(x) for x in xs[1:]]
        us = run(pdl, early, weights, xs)
        results[name] = (round(us, 2), xs[-1].clone())
        print(name, round(us, 2), "us per call;", round(floor_bytes / (us * 1e-6) / 1e12, 2), "TB/s", flush=True)
    base = results["plain"][1]
    print("same output:", {name: bool(torch.equal(out, base)) for name, (_, out) in results.items()})


if __name__ == "__main__":
    main()
