"""Batch-1 projections on a GPU: cuBLAS against a Triton matrix-vector kernel, per Llama-3-8B shape.

A batch-1 decode step reads every weight once; its GEMMs already run near the copy floor, and what is
left is ~420 launches of small kernels and the gaps between them. cuBLAS runs two of the four
projections per layer as split-K (a GEMM plus a reduce kernel). This asks whether one Triton kernel per
projection, with no split, reads the weights as fast: if so, the reduce launches go, and the kernel can
take the small op before it (SiLU-mul before the down projection, timed both ways). The kernel is the
engine's (worker/torch_engine/matvec.py): its own tiling per shape, and the best of a sweep.

Each case is timed as the decode step runs it: the projection over enough copies of its weight to
defeat the L2 cache, one after the other, inside a CUDA graph; a figure is microseconds per call.

    python benchmarks/gemv_m1.py [--check] [--tp 2] [--rows 2]

--tp N takes one rank's shapes at tensor parallelism N (column-parallel qkv, gate-up and head, row-parallel
o and down). --rows 2 times two rows (decode steps of two sequences): the kernel's two-row tiling, the
one-row tiling, and the sweep.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.graph_timing import graphed_calls_us  # noqa: E402
from benchmarks.serving import measure_bandwidth_gb_s  # noqa: E402
from worker.torch_engine.fused import silu_mul as engine_silu_mul  # noqa: E402
from worker.torch_engine.matvec import Tiling, matvec, tiling  # noqa: E402

per_call_us = functools.partial(graphed_calls_us, replays=20)  # the calls in one graph, replayed 20 times
# (name, out features N, in features K) of random Llama-3-8B at TP=1
SHAPES = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336),
          ("lm_head", 128256, 4096)]
ROW_PARALLEL = ("o", "down")  # split along K at tensor parallelism; the others along N


def rank_shapes(tp: int) -> list[tuple[str, int, int]]:
    """One rank's (name, N, K) at tensor parallelism tp."""
    return [(name, n, k // tp) if name in ROW_PARALLEL else (name, -(-n // tp), k) for name, n, k in SHAPES]
CONFIGS = [Tiling(n, k, w, s) for n, k, w, s in itertools.product((4, 8, 16), (512, 1024), (4, 8), (2, 4))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare results against F.linear")
    parser.add_argument("--out", default="", help="write the figures as JSON here")
    parser.add_argument("--tp", type=int, default=1, help="one rank's shapes at this tensor parallelism")
    parser.add_argument("--rows", type=int, default=1, help="rows of x (up to the kernel's MAX_INPUTS)")
    args = parser.parse_args()
    shapes = rank_shapes(args.tp)
    torch.manual_seed(0)
    dtype, device = torch.bfloat16, "cuda"
    if args.check:
        for name, n, k in shapes:
            w = torch.randn(n, k, device=device, dtype=dtype) * 0.02
            x = torch.randn(args.rows, k, device=device, dtype=dtype)
            want = F.linear(x.float(), w.float())
            got = matvec(x, w).float()
            print(name, "max abs error against fp32:", (got - want).abs().max().item(),
                  "cuBLAS's:", (F.linear(x, w).float() - want).abs().max().item())
        return
    bandwidth = measure_bandwidth_gb_s() * 1e9  # bytes per second, as the engine's floors use it
    print(f"{torch.cuda.get_device_name()}: copy {bandwidth / 1e9:.0f} GB/s")
    report: dict[str, object] = {"gpu": torch.cuda.get_device_name(), "copy_gb_s": round(bandwidth / 1e9, 1),
                                 "tp": args.tp, "rows": args.rows, "shapes": {}}
    for name, n, k in shapes:
        copies = max(2, math.ceil((256 << 20) / (n * k * 2)))
        weights = [torch.randn(n, k, device=device, dtype=dtype) * 0.02 for _ in range(copies)]
        floor_us = n * k * 2 / bandwidth * 1e6
        x = torch.randn(args.rows, k, device=device, dtype=dtype)
        cublas = per_call_us([lambda w=w: F.linear(x, w) for w in weights])
        best = None
        for config in CONFIGS:
            us = per_call_us([lambda w=w, c=config: matvec(x, w, tiles=c) for w in weights])
            if best is None or us < best[0]:
                best = (us, config)
        assert best is not None
        own = per_call_us([lambda w=w: matvec(x, w) for w in weights])
        row = {"floor_us": round(floor_us, 2), "cublas_us": round(cublas, 2), "triton_us": round(best[0], 2),
               "triton_config": dataclasses.asdict(best[1]), "own_tiling": dataclasses.asdict(tiling(n, k, args.rows)),
               "own_tiling_us": round(own, 2), "one_row_tiling_us": round(own if args.rows == 1 else per_call_us(
                   [lambda w=w: matvec(x, w, tiles=tiling(n, k)) for w in weights]), 2)}
        if name == "down":  # with SiLU-mul before it, which today is a kernel of its own
            v = torch.randn(args.rows, 2 * k, device=device, dtype=dtype)
            silu_mul = lambda: F.silu(v[:, :k]) * v[:, k:]  # noqa: E731
            row["cublas_with_silu_mul_us"] = round(per_call_us(
                [lambda w=w: F.linear(silu_mul(), w) for w in weights]), 2)
            row["triton_fused_silu_mul_us"] = round(per_call_us(
                [lambda w=w: matvec(v, w, silu_mul=True) for w in weights]), 2)
            row["triton_after_silu_mul_us"] = round(per_call_us(
                [lambda w=w: matvec(engine_silu_mul(v), w) for w in weights]), 2)
        report["shapes"][name] = row  # type: ignore[index]
        print(f"{name:8s} N={n:6d} K={k:5d}: floor {floor_us:7.2f} us, cuBLAS {cublas:7.2f} "
              f"({floor_us / cublas:.0%}), Triton {best[0]:7.2f} ({floor_us / best[0]:.0%}) {best[1]}, "
              f"own tiling {own:7.2f}, one row's tiling {row['one_row_tiling_us']:7.2f}"
              + (f"; with SiLU-mul: cuBLAS {row['cublas_with_silu_mul_us']}, fused {row['triton_fused_silu_mul_us']}, "
                 f"after it {row['triton_after_silu_mul_us']}"
                 if name == "down" else ""))
        del weights
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
