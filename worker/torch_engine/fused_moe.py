"""Mixtral's experts as two grouped GEMMs in Triton (CUDA; also runs under TRITON_INTERPRET=1).

The reference `MixtureOfExperts` loops over the experts on the host: it needs the per-expert token counts
(`.tolist()`, a device sync), then launches one gather, two GEMMs and one index_add per expert. That costs
a sync and dozens of launches a layer, and it cannot be captured in a CUDA graph because the shapes depend
on the routing.

Here every step has a shape that depends only on (T, E, K) and the block size, so a decode step holding it
can be captured once and replayed:

1. Grouping (one single-program kernel, a counting sort). The T*K (token, expert) pairs are numbered
   p = t*K + k and grouped by expert, keeping their order within an expert. Each expert's run is padded
   to a multiple of BLOCK_M, and the runs are laid end to end in a buffer sized for the worst case,
   T*K + min(E, T*K)*(BLOCK_M-1) rows; padding rows hold the sentinel T*K. Every BLOCK_M-row block then
   belongs to one expert (`block_expert`), and the number of rows in use stays on the device
   (`padded_total`). Done with a dozen torch ops (sort, scatter, searchsorted) this was the same GPU work
   but cost ~0.45 ms of launches in eager mode; the kernel costs one launch.
2. GEMM 1: one program per (block of BLOCK_M pair rows, BLOCK_N intermediate columns). It gathers the
   tokens' rows of x, multiplies them by that expert's gate rows and up rows (two fp32 accumulators) and
   writes silu(gate) * up, per pair, to an [T*K, I] buffer.
3. GEMM 2: the same grid over the hidden columns, reading the pairs' intermediate rows against the
   expert's down projection; the epilogue multiplies in the routing weight and writes an fp32 [T*K, H]
   buffer.
4. The K contributions of each token are summed in fp32 and cast to x's dtype.

Programs whose block lies past `padded_total` return at once, so the grid can be sized for the worst case.
No atomics: the result is deterministic, and a graph replay gives the eager result bit for bit.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the engine keeps the reference loop
    triton = None

# Triton's CPU interpreter multiplies bf16 tiles as raw 16-bit integers, so there the kernels widen their
# tiles to fp32 before tl.dot (exact: a bf16 product fits in fp32). Compiled kernels use bf16 tensor cores.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


if triton is not None:

    @triton.jit
    def _align_kernel(
        ids_ptr, pairs_ptr, block_expert_ptr, padded_total_ptr, num_pairs, num_blocks,
        NUM_EXPERTS: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr,
    ):
        """A counting sort of the pairs by expert, in one program: count, lay out the padded runs, place."""
        experts = tl.arange(0, E_PAD)
        offs = tl.arange(0, CHUNK)
        counts = tl.zeros([E_PAD], dtype=tl.int32)
        for start in range(0, num_pairs, CHUNK):
            ids = tl.load(ids_ptr + start + offs, mask=start + offs < num_pairs, other=-1).to(tl.int32)
            counts += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
        padded = (counts + (BLOCK_M - 1)) // BLOCK_M * BLOCK_M
        padded_end = tl.cumsum(padded, axis=0)
        padded_start = padded_end - padded
        tl.store(padded_total_ptr, tl.sum(padded, axis=0))
        # The padding rows of each run (fewer than BLOCK_M) get the sentinel num_pairs.
        slots = tl.arange(0, BLOCK_M)
        pad_rows = (padded_start + counts)[:, None] + slots[None, :]
        pad_ok = slots[None, :] < (padded - counts)[:, None]
        tl.store(pairs_ptr + pad_rows, tl.zeros([E_PAD, BLOCK_M], dtype=tl.int32) + num_pairs, mask=pad_ok)
        # Each pair goes to its expert's next free row; pairs keep their order within an expert.
        next_row = padded_start
        for start in range(0, num_pairs, CHUNK):
            index = start + offs
            ok = index < num_pairs
            ids = tl.load(ids_ptr + index, mask=ok, other=-1).to(tl.int32)
            onehot = (ids[:, None] == experts[None, :]).to(tl.int32)  # [CHUNK, E_PAD]
            before = tl.cumsum(onehot, axis=0) - onehot  # earlier pairs of the same expert in this chunk
            dest = tl.sum((next_row[None, :] + before) * onehot, axis=1)
            tl.store(pairs_ptr + dest, index, mask=ok)
            next_row += tl.sum(onehot, axis=0)
        # Block b's expert: how many runs end at or before its first row (capped for unused blocks).
        for start in range(0, num_blocks, CHUNK):
            blocks = start + offs
            ended = (padded_end[None, :] <= (blocks * BLOCK_M)[:, None]) & (experts[None, :] < NUM_EXPERTS)
            expert = tl.minimum(tl.sum(ended.to(tl.int32), axis=1), NUM_EXPERTS - 1)
            tl.store(block_expert_ptr + blocks, expert, mask=blocks < num_blocks)

    @triton.jit
    def _dot(a, b, acc, PRECISION: tl.constexpr, WIDEN: tl.constexpr):
        if WIDEN:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, acc, input_precision=PRECISION)

    @triton.jit
    def _gate_up_silu_kernel(
        x_ptr, w_ptr, out_ptr, pairs_ptr, block_expert_ptr, padded_total_ptr,
        num_pairs, inter, hidden, stride_x, stride_we, stride_wn, stride_out,
        TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        PRECISION: tl.constexpr, WIDEN: tl.constexpr,
    ):
        """out[p, n] = silu(x[p // K] . w[e, n]) * (x[p // K] . w[e, inter + n]) for the block's pairs p."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        if pid_m * BLOCK_M >= tl.load(padded_total_ptr):
            return
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pairs = tl.load(pairs_ptr + rows)
        row_ok = pairs < num_pairs
        tokens = (pairs // TOP_K).to(tl.int64)
        expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < inter
        ks = tl.arange(0, BLOCK_K)
        a_ptrs = x_ptr + tokens[:, None] * stride_x + ks[None, :]
        g_ptrs = w_ptr + expert * stride_we + cols[None, :].to(tl.int64) * stride_wn + ks[:, None]
        u_ptrs = g_ptrs + inter * stride_wn
        acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            k_ok = (k0 + ks) < hidden
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w_mask = k_ok[:, None] & col_ok[None, :]
            g = tl.load(g_ptrs, mask=w_mask, other=0.0)
            u = tl.load(u_ptrs, mask=w_mask, other=0.0)
            acc_gate = _dot(a, g, acc_gate, PRECISION, WIDEN)
            acc_up = _dot(a, u, acc_up, PRECISION, WIDEN)
            a_ptrs += BLOCK_K
            g_ptrs += BLOCK_K
            u_ptrs += BLOCK_K
        act = acc_gate * tl.sigmoid(acc_gate) * acc_up
        out_ptrs = out_ptr + pairs[:, None].to(tl.int64) * stride_out + cols[None, :]
        tl.store(out_ptrs, act.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _down_weighted_kernel(
        act_ptr, w_ptr, out_ptr, weights_ptr, pairs_ptr, block_expert_ptr, padded_total_ptr,
        num_pairs, hidden, inter, stride_act, stride_we, stride_wn, stride_out,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
        WIDEN: tl.constexpr,
    ):
        """out[p, n] = weight[p] * (act[p] . w[e, n]) in fp32 for the block's pairs p."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        if pid_m * BLOCK_M >= tl.load(padded_total_ptr):
            return
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pairs = tl.load(pairs_ptr + rows)
        row_ok = pairs < num_pairs
        pairs64 = pairs.to(tl.int64)
        expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < hidden
        ks = tl.arange(0, BLOCK_K)
        a_ptrs = act_ptr + pairs64[:, None] * stride_act + ks[None, :]
        w_ptrs = w_ptr + expert * stride_we + cols[None, :].to(tl.int64) * stride_wn + ks[:, None]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, inter, BLOCK_K):
            k_ok = (k0 + ks) < inter
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = _dot(a, w, acc, PRECISION, WIDEN)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        weight = tl.load(weights_ptr + pairs64, mask=row_ok, other=0.0)
        acc = acc * weight[:, None]
        out_ptrs = out_ptr + pairs64[:, None] * stride_out + cols[None, :]
        tl.store(out_ptrs, acc, mask=row_ok[:, None] & col_ok[None, :])


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


def _pick_block_m(num_pairs: int, num_experts: int) -> int:
    """Rows per block: 16 while few pairs reach each expert (decode: little padding, the GEMMs stream the
    weights), larger for prefill, where bigger tiles run the tensor cores harder."""
    per_expert = num_pairs / num_experts
    if per_expert <= 16:
        return 16
    if per_expert <= 128:
        return 64
    return 128


# (BLOCK_N, BLOCK_K, num_warps, num_stages) per BLOCK_M for GEMM 1 and GEMM 2, bf16/fp16, from a small sweep
# on an H200 with Mixtral-8x7B shapes (the decode tiles reach about the card's memory bandwidth). fp32 tiles take twice the shared memory: BLOCK_K halves there.
_GEMM_CONFIGS = {
    16: ((32, 128, 4, 4), (64, 256, 4, 4)),
    64: ((128, 64, 8, 4), (128, 64, 8, 3)),
    128: ((128, 64, 8, 4), (128, 128, 8, 3)),
}


def _configs(block_m: int, dtype: torch.dtype) -> tuple[dict[str, int], dict[str, int]]:
    """Launch parameters for (GEMM 1, GEMM 2)."""
    wide = dtype == torch.float32

    def config(block_n: int, block_k: int, warps: int, stages: int) -> dict[str, int]:
        if wide:
            block_k, stages = (32, 3) if block_m >= 64 else (block_k // 2, stages)
        return {"BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": warps, "num_stages": stages}

    gate_up, down = _GEMM_CONFIGS[block_m]
    return config(*gate_up), config(*down)


def align_by_expert(topk_ids: torch.Tensor, num_experts: int,
                    block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the (token, expert) pairs by expert in BLOCK_M-padded runs, on the device (one small kernel).

    topk_ids [T, K]. Returns (pairs [blocks * block_m] int32: the pair index t*K + k of each row, T*K where
    the row pads its expert's run, unset past padded_total; block_expert [blocks] int32: the expert of each
    block of rows; padded_total [1] int32: how many rows are in use). `blocks` depends only on T*K, E and
    block_m, not on the routing.
    """
    ids = topk_ids.reshape(-1).contiguous()
    num_pairs = ids.numel()
    max_rows = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    blocks = triton.cdiv(max_rows, block_m)
    pairs = torch.empty(blocks * block_m, dtype=torch.int32, device=ids.device)
    block_expert = torch.empty(blocks, dtype=torch.int32, device=ids.device)
    padded_total = torch.empty(1, dtype=torch.int32, device=ids.device)
    e_pad = max(16, triton.next_power_of_2(num_experts))
    _align_kernel[(1,)](
        ids, pairs, block_expert, padded_total, num_pairs, blocks,
        NUM_EXPERTS=num_experts, E_PAD=e_pad, BLOCK_M=block_m, CHUNK=max(16, 4096 // e_pad), num_warps=4,
    )
    return pairs, block_expert, padded_total


def fused_experts(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor) -> torch.Tensor:
    """sum_k topk_weights[t, k] * down[e] @ (silu(gate[e] @ x[t]) * (up[e] @ x[t])), e = topk_ids[t, k].

    x [T, H]; gate_up [E, 2I, H] (gate rows, then up rows); down [E, H, I]; topk_weights [T, K] float32;
    topk_ids [T, K] int32 or int64. Returns [T, H] in x's dtype; accumulation is fp32 throughout. No host
    sync and no shape depends on the routing, so it can be captured in a CUDA graph.
    """
    num_tokens, hidden = x.shape
    num_experts, two_inter, _ = gate_up.shape
    inter = two_inter // 2
    top_k = topk_ids.shape[1]
    assert gate_up.shape[2] == hidden and down.shape == (num_experts, hidden, inter), (gate_up.shape, down.shape)
    assert topk_weights.shape == topk_ids.shape == (num_tokens, top_k)
    if num_tokens == 0:
        return torch.empty_like(x)
    x = x.contiguous()
    if gate_up.stride(2) != 1:
        gate_up = gate_up.contiguous()
    if down.stride(2) != 1:
        down = down.contiguous()
    weights = topk_weights.reshape(-1).float().contiguous()
    num_pairs = num_tokens * top_k
    block_m = _pick_block_m(num_pairs, num_experts)
    pairs, block_expert, padded_total = align_by_expert(topk_ids, num_experts, block_m)
    blocks = block_expert.numel()
    widen = _INTERPRET and x.dtype != torch.float32
    precision = "ieee" if x.dtype == torch.float32 or widen else "tf32"  # fp32 inputs: no TF32 rounding
    cfg1, cfg2 = _configs(block_m, x.dtype)

    act = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    _gate_up_silu_kernel[(blocks, triton.cdiv(inter, cfg1["BLOCK_N"]))](
        x, gate_up, act, pairs, block_expert, padded_total,
        num_pairs, inter, hidden, x.stride(0), gate_up.stride(0), gate_up.stride(1), act.stride(0),
        TOP_K=top_k, BLOCK_M=block_m, PRECISION=precision, WIDEN=widen, **cfg1,
    )
    partial = torch.empty(num_pairs, hidden, dtype=torch.float32, device=x.device)
    _down_weighted_kernel[(blocks, triton.cdiv(hidden, cfg2["BLOCK_N"]))](
        act, down, partial, weights, pairs, block_expert, padded_total,
        num_pairs, hidden, inter, act.stride(0), down.stride(0), down.stride(1), partial.stride(0),
        BLOCK_M=block_m, PRECISION=precision, WIDEN=widen, **cfg2,
    )
    return partial.view(num_tokens, top_k, hidden).sum(dim=1).to(x.dtype)
