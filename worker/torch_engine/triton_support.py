"""What the Triton kernels share: the optional Triton import, tl.dot settings, the attention inner step,
and programmatic dependent launch.

Programmatic dependent launch (PDL, Hopper and later): in a CUDA graph each kernel otherwise waits for the
one before it to finish, drain and flush before its first program starts, ~2 us a launch; a batch-1 decode
step makes ~320 of them, nearly all Triton's. Launched as a programmatic dependent, a kernel's programs
start while the one before finishes: they may read what no kernel writes (weights) at once, and
wait_for_predecessor blocks them until the predecessor's memory is complete before anything else. Each
kernel lets its own dependents start right after that wait, so a kernel starts only when every kernel
before it has completed, except the one right before, which it waits for. On one H200 a chain of 64
one-row matvecs went from 12.0 to 10.2 us a call (`benchmarks/pdl_probe.py`). The worker's --no-pdl turns it
off; --pdl-max-rows moves the widest launch that takes it (default 32, see pdl_args).
"""

from __future__ import annotations

import functools
import os

import torch

from worker.config import WorkerConfig

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the engine falls back to SDPA
    triton = None
    tl = None

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # no Triton, or one without PDL
    gdc_launch_dependents = gdc_wait = None

# Triton's CPU interpreter multiplies bf16 tiles as raw 16-bit integers (and computes bf16 arithmetic on
# the bit patterns), so there the kernels widen tl.dot's operands to fp32; compiled kernels keep bf16.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class DependentLaunch:
    """This process's PDL setting, set once from the worker's configuration (set_dependent_launch)."""

    enabled = WorkerConfig.pdl
    max_rows = WorkerConfig.pdl_max_rows  # launches over up to this many rows take PDL


def set_dependent_launch(enabled: bool, max_rows: int) -> None:
    """Whether this process's Triton launches take PDL, and up to how many rows (WorkerConfig.pdl, pdl_max_rows)."""
    DependentLaunch.enabled, DependentLaunch.max_rows = enabled, max_rows


def available(device: torch.device) -> bool:
    """Whether the engine may use the Triton kernels on this device (compiled: CUDA only)."""
    return triton is not None and device.type == "cuda"


@functools.cache
def _supports_dependent_launch(device_index: int) -> bool:
    return gdc_wait is not None and not INTERPRET and torch.cuda.get_device_capability(device_index) >= (9, 0)


def pdl_args(device: torch.device, rows: int) -> dict[str, bool]:
    """A kernel launch's keyword arguments for PDL on device: its PDL constexpr, and Triton's launch_pdl when on.

    On for launches over up to DependentLaunch.max_rows rows (default 32: decode steps of up to 32 sequences).
    On one H200 (random Llama-3-8B, bf16, pipelined) that made steps of 8 to 32 sequences 1-1.4% faster than
    PDL on one row only, and one TP=2 rank's 1.4-2.5% (`SETTINGS=... benchmarks/gpu_decode_ab.sh`). At more
    rows the kernels before are cuBLAS's GEMMs and attention kernels of many programs, and dependents that
    start early and wait hold SM room they could use: batch-64 and batch-128 steps got 2.5% and 4.7% slower
    with PDL everywhere.
    """
    if not DependentLaunch.enabled or rows > DependentLaunch.max_rows or device.type != "cuda":
        return {"PDL": False}
    if not _supports_dependent_launch(device.index if device.index is not None else torch.cuda.current_device()):
        return {"PDL": False}
    return {"PDL": True, "launch_pdl": True}


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
    def wait_for_predecessor(PDL: tl.constexpr):
        """Under PDL: block until the kernel before has completed, then let the kernel after start."""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()

    @triton.jit
    def dot(a, b, PRECISION: tl.constexpr, WIDEN: tl.constexpr):
        """a @ b in fp32; WIDEN lifts bf16/fp16 operands to fp32 first (the interpreter's workaround)."""
        if WIDEN:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, input_precision=PRECISION)

    @triton.jit
    def attend(acc, running_max, running_sum, q, k_head_ptr, v_head_ptr, stride_kt, stride_vt, table_ptr, positions,
               valid, query_pos, slopes, qk_scale, dims, dim_ok, BLOCK_SIZE: tl.constexpr, HAS_ALIBI: tl.constexpr,
               PRECISION: tl.constexpr, WIDEN: tl.constexpr):
        """One online-softmax step (base 2) for the rows of q over the keys at `positions` of one KV head.

        A row sees the keys that are `valid` and at or before its query_pos; with ALiBi it adds
        slope * (key position - query_pos), the slopes already scaled by log2(e). Every row must have
        seen a key by its first step (running_max stays finite). Returns (acc, running_max, running_sum).
        """
        slots = cache_rows(table_ptr, positions, valid, BLOCK_SIZE)
        k = tl.load(k_head_ptr + slots[None, :] * stride_kt + dims[:, None], mask=valid[None, :] & dim_ok[:, None],
                    other=0.0)  # [DIM_PAD, keys]
        scores = dot(q, k, PRECISION, WIDEN) * qk_scale  # [rows, keys]
        distance = positions[None, :] - query_pos[:, None]
        if HAS_ALIBI:
            scores += slopes[:, None] * distance.to(tl.float32)
        scores = tl.where(valid[None, :] & (distance <= 0), scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        correction = tl.exp2(running_max - new_max)
        weights = tl.exp2(scores - new_max[:, None])
        running_sum = running_sum * correction + tl.sum(weights, axis=1)
        v = tl.load(v_head_ptr + slots[:, None] * stride_vt + dims[None, :], mask=valid[:, None] & dim_ok[None, :],
                    other=0.0)  # [keys, DIM_PAD]
        acc = acc * correction[:, None] + dot(weights.to(v.dtype), v, PRECISION, WIDEN)
        return acc, new_max, running_sum
