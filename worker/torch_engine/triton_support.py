"""What the paged attention kernels share: the optional Triton import, cache addressing, tl.dot settings."""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the engine falls back to SDPA
    triton = None
    tl = None

# Triton's CPU interpreter multiplies bf16 tiles as raw 16-bit integers (and computes bf16 arithmetic on
# the bit patterns), so there the kernels widen tl.dot's operands to fp32; compiled kernels keep bf16.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available(device: torch.device) -> bool:
    """Whether the engine may use the Triton kernels on this device (compiled: CUDA only)."""
    return triton is not None and device.type == "cuda"


def dot_settings(dtype: torch.dtype) -> tuple[str, bool]:
    """tl.dot's (input precision, widen-to-fp32) for caches of this dtype.

    fp32 caches get full fp32 products ("ieee"; TF32 would cost ~1e-3 relative error).
    """
    widen = INTERPRET and dtype != torch.float32
    return ("ieee" if dtype == torch.float32 or widen else "tf32"), widen


if triton is not None:

    @triton.jit
    def cache_rows(table_ptr, positions, mask, BLOCK_SIZE: tl.constexpr):
        """The cache row (slot, int64: caches may exceed 2^31 elements) of each token position."""
        blocks = tl.load(table_ptr + positions // BLOCK_SIZE, mask=mask, other=0).to(tl.int64)
        return blocks * BLOCK_SIZE + positions % BLOCK_SIZE

    @triton.jit
    def dot(a, b, PRECISION: tl.constexpr, WIDEN: tl.constexpr):
        """a @ b in fp32; WIDEN lifts bf16/fp16 operands to fp32 first (the interpreter's workaround)."""
        if WIDEN:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, input_precision=PRECISION)
