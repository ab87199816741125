"""x @ W.T where a row's result does not depend on the other rows: batch-invariant projections (CUDA, Triton).

cuBLAS picks its kernel by the number of rows. Some of its kernels split the inner dimension and add
the pieces in another order, so in bfloat16 a sequence's hidden states, and in time its greedy
tokens, change with what else is in its batch. Here the tiling is fixed by the weight's shape alone:
every output element is the sum over the inner dimension in the same BLOCK_K pieces, in the same
order, by the same tensor-core instruction, whether the step has 1 row or 2048. The batch only sets
the grid. It reads the weights at a lower fraction of the bandwidth than cuBLAS on a single row, so
it is a mode (`--batch-invariant`), not the default.
"""

from __future__ import annotations

import torch

from worker.torch_engine.triton_support import dot_settings, tl, triton

BLOCK_M = 64
BLOCK_K = 64

if triton is not None:
    from worker.torch_engine.triton_support import dot

    @triton.jit(do_not_specialize=["rows"])
    def _matmul_kernel(x_ptr, w_ptr, out_ptr, rows, cols, inner, stride_x, stride_w, stride_out,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       PRECISION: tl.constexpr, WIDEN: tl.constexpr):
        # Row tiles vary fastest: the programs that run together share one strip of W (read once, then from L2).
        row_tiles = tl.cdiv(rows, BLOCK_M)
        pid = tl.program_id(0)
        tile_m, tile_n = pid % row_tiles, pid // row_tiles
        offs_m = (tile_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_n = (tile_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for start in range(0, inner, BLOCK_K):
            k = start + offs_k
            a = tl.load(x_ptr + offs_m[:, None] * stride_x + k[None, :],
                        mask=(offs_m[:, None] < rows) & (k[None, :] < inner), other=0.0)
            b = tl.load(w_ptr + offs_n[None, :] * stride_w + k[:, None],
                        mask=(offs_n[None, :] < cols) & (k[:, None] < inner), other=0.0)
            acc += dot(a, b, PRECISION, WIDEN)
        tl.store(out_ptr + offs_m[:, None] * stride_out + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=(offs_m[:, None] < rows) & (offs_n[None, :] < cols))


def block_n(cols: int) -> int:
    """Output columns per program: narrow enough that a single row still spreads over the GPU's SMs."""
    return 32 if cols <= 8192 else 64 if cols <= 32768 else 128


def invariant_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [rows, inner] @ weight [cols, inner].T, each row computed the same whatever the other rows."""
    rows, inner = x.shape
    cols = weight.shape[0]
    x = x if x.stride(-1) == 1 else x.contiguous()
    out = x.new_empty(rows, cols)
    if rows == 0:
        return out
    width = block_n(cols)
    precision, widen = dot_settings(x.dtype)
    grid = (triton.cdiv(rows, BLOCK_M) * triton.cdiv(cols, width),)
    _matmul_kernel[grid](x, weight, out, rows, cols, inner, x.stride(0), weight.stride(0), out.stride(0),
                         BLOCK_M=BLOCK_M, BLOCK_N=width, BLOCK_K=BLOCK_K, PRECISION=precision, WIDEN=widen,
                         num_warps=4, num_stages=4)
    return out
