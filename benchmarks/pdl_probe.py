"""Programmatic dependent launch (PDL) on a chain of one-row matvecs in a CUDA graph: does it close the gaps?

    python benchmarks/pdl_probe.py

A chain of 64 [1, 4096] x [4096, 4096] matvecs (each reads the one before), in a CUDA graph, timed per call:
plain launches; launched with PDL, waiting on the predecessor first thing; and with PDL, loading the first
weight tile before the wait (weights do not depend on the predecessor).
"""

from __future__ import annotations

import time

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


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


def run(pdl: bool, early: bool, weights, xs) -> float:
    n, k = weights[0].shape

    def chain() -> None:
        for i, w in enumerate(weights):
            kwargs = {"launch_pdl": True} if pdl else {}
            matvec[(n // 16,)](xs[i], w, xs[i + 1], n, k, BLOCK_N=16, BLOCK_K=1024, PDL=pdl, EARLY=early,
                               num_warps=8, num_stages=2, **kwargs)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        chain()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chain()
    graph.replay()
    torch.cuda.synchronize()
    out_first = xs[-1].clone()
    start = time.perf_counter()
    for _ in range(50):
        graph.replay()
    torch.cuda.synchronize()
    us = (time.perf_counter() - start) / (50 * len(weights)) * 1e6
    return us, out_first


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
        us, out = run(pdl, early, weights, xs)
        results[name] = (round(us, 2), out)
        print(name, round(us, 2), "us per call;", round(floor_bytes / (us * 1e-6) / 1e12, 2), "TB/s", flush=True)
    base = results["plain"][1]
    print("same output:", {name: bool(torch.equal(out, base)) for name, (_, out) in results.items()})


if __name__ == "__main__":
    main()
