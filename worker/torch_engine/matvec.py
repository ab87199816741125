"""One or two rows times a weight matrix on CUDA, in one Triton kernel: the projections of decode steps of
one or two sequences.

A batch-1 step reads every weight once, and its cost is that read plus every launch around it. At one row
cuBLAS runs some projections as split-K (a GEMM, then a reduce kernel), and SiLU-mul before the down
projection is a kernel of its own. Here each program reads BLOCK_N whole rows of the weight, so one launch
per projection, and the down projection can compute SiLU-mul from the gate-up output as it reads it
(rounded where eager rounds). On one H200, random Llama-3-8B shapes in bf16, one call each inside a CUDA
graph (`benchmarks/gemv_m1.py`): qkv 14.4 against cuBLAS's 16.8 us, o 10.3 against 13.5, gate-up 56.2
against 61.3, down 29.4 against 32.0 (with SiLU-mul 31.5 against 36.1), the head 236.6 against 250.7.

Two rows take the same kernel with a second accumulator, each weight tile read once for both: at one TP=2
rank's shapes qkv 9.4 against cuBLAS's 10.7 us, o 6.0 against 7.1, down 17.1 against 19.5
(`gemv_m1.py --rows 2`). Wider outputs lost to cuBLAS, which reads them at 76-97% of the copy rate (TP=1
qkv 17.8 against 15.5 us, gate-up, the head), so Projection keeps cuBLAS for those. Three or four rows lost
everywhere (`benchmarks/results/gpu-engine-h200/one-row-matvec/multi-row-not-adopted`).

Half precision only: float32 keeps cuBLAS, whose sums the fp32 token checks compare against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.torch_engine.triton_support import pdl_args, tl, triton

if triton is not None:
    from worker.torch_engine.triton_support import wait_for_predecessor

    @triton.jit
    def _weight_tile(w_ptr, rows, in_range, cols, k, EVEN_K: tl.constexpr):
        w_ptrs = w_ptr + rows.to(tl.int64)[:, None] * k + cols[None, :]
        if EVEN_K:  # every column in range: no column mask
            return tl.load(w_ptrs, mask=in_range[:, None], other=0.0)
        return tl.load(w_ptrs, mask=in_range[:, None] & (cols < k)[None, :], other=0.0)

    @triton.jit
    def _input_tile(x_ptr, cols, k, EVEN_K: tl.constexpr, SILU_MUL: tl.constexpr):
        """x's columns in float32; with SILU_MUL, x is [gate | up], 2k wide, and this is silu(gate) * up, each
        product rounded as eager rounds it."""
        col_mask = cols < k
        if EVEN_K:
            first = tl.load(x_ptr + cols).to(tl.float32)
            second = tl.load(x_ptr + k + cols).to(tl.float32) if SILU_MUL else first
        else:
            first = tl.load(x_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
            second = tl.load(x_ptr + k + cols, mask=col_mask, other=0.0).to(tl.float32) if SILU_MUL else first
        if SILU_MUL:
            activated = (first / (1.0 + tl.exp(-first))).to(x_ptr.dtype.element_ty).to(tl.float32)
            return (activated * second).to(x_ptr.dtype.element_ty).to(tl.float32)
        return first

    @triton.jit
    def _matvec_kernel(x_ptr, w_ptr, y_ptr, n, k, stride_x, stride_y, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       EVEN_K: tl.constexpr, SILU_MUL: tl.constexpr, TWO: tl.constexpr, PDL: tl.constexpr):
        """y = W @ x for one row of x, or for two (TWO), each weight tile read once for both. Each row has an
        accumulator of its own and the operations of a single row: under the same tiling, its sum alone."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_range = rows < n
        cols = tl.arange(0, BLOCK_K)
        w = _weight_tile(w_ptr, rows, in_range, cols, k, EVEN_K)  # weights: read before the predecessor ends
        wait_for_predecessor(PDL)
        acc = w.to(tl.float32) * _input_tile(x_ptr, cols, k, EVEN_K, SILU_MUL)[None, :]
        if TWO:
            acc2 = w.to(tl.float32) * _input_tile(x_ptr + stride_x, cols, k, EVEN_K, SILU_MUL)[None, :]
        for start in range(BLOCK_K, k, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            w = _weight_tile(w_ptr, rows, in_range, cols, k, EVEN_K)
            acc += w.to(tl.float32) * _input_tile(x_ptr, cols, k, EVEN_K, SILU_MUL)[None, :]
            if TWO:
                acc2 += w.to(tl.float32) * _input_tile(x_ptr + stride_x, cols, k, EVEN_K, SILU_MUL)[None, :]
        tl.store(y_ptr + rows, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=in_range)
        if TWO:
            tl.store(y_ptr + stride_y + rows, tl.sum(acc2, axis=1).to(y_ptr.dtype.element_ty), mask=in_range)


MAX_INPUTS = 2  # rows of x one launch takes: decode steps of one or two sequences


@dataclass(frozen=True)
class Tiling:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# One rank's Llama-3-8B projections at TP=2 that the rule below misses, from the same sweep (`gemv_m1.py --tp 2`,
# one H200, PDL on): qkv 6.96 against the rule's 7.64 us, o 4.36 against 4.82, down 14.68 against 14.98.
SWEPT = {(3072, 4096): Tiling(8, 1024, 8, 2), (4096, 2048): Tiling(4, 1024, 4, 2),
         (4096, 7168): Tiling(4, 1024, 4, 2)}


def tiling(n: int, k: int, inputs: int = 1) -> Tiling:
    """Fixed by the weight's shape and the row count alone (never tuned at run time, so a row's sum is the same
    every start). From a sweep on an H200 (`benchmarks/gemv_m1.py`): narrow outputs want long rows per program,
    wide ones more programs."""
    if inputs == 2:  # two accumulators: narrower programs (the sweep at TP=2 rank shapes, `--rows 2`)
        return Tiling(4, 1024 if k > 4096 else 512, 4, 2)
    if (n, k) in SWEPT:
        return SWEPT[(n, k)]
    if n <= 4096:
        return Tiling(16, 1024, 8, 4 if k > 8192 else 2)
    if n > 65536:
        return Tiling(16, 512, 4, 4)
    return Tiling(8, 512, 4, 2)


def applies(weight: torch.Tensor) -> bool:
    """Whether rows of one token through this weight take the kernel."""
    return (triton is not None and weight.is_cuda and weight.dtype in (torch.bfloat16, torch.float16)
            and weight.dim() == 2 and weight.is_contiguous())


def matvec(x: torch.Tensor, weight: torch.Tensor, silu_mul: bool = False, tiles: Tiling | None = None) -> torch.Tensor:
    """x [m, k] @ weight [n, k].T as [m, n], m from 1 to MAX_INPUTS; with silu_mul, x is [m, 2k] = [gate | up]
    and the product is taken with silu(gate) * up. tiles: the shape's own tiling unless given (sweeps)."""
    n, k = weight.shape
    m = x.shape[0]
    assert 1 <= m <= MAX_INPUTS and x.shape[1] == (2 * k if silu_mul else k) and x.dtype == weight.dtype
    x = x if x.stride(-1) == 1 else x.contiguous()
    out = x.new_empty(m, n)
    t = tiles or tiling(n, k, m)
    _matvec_kernel[(triton.cdiv(n, t.block_n),)](x, weight, out, n, k, x.stride(0), out.stride(0),
                                                  BLOCK_N=t.block_n, BLOCK_K=t.block_k, EVEN_K=k % t.block_k == 0,
                                                  SILU_MUL=silu_mul, TWO=m == 2, num_warps=t.num_warps,
                                                  num_stages=t.num_stages, **pdl_args(x.device, rows=m))
    return out
