"""Attention straight from the paged KV cache (Triton; CUDA, or Triton's CPU interpreter in tests).

Cache layout: token `pos` of a sequence lives in slot `table[pos // block_size] * block_size +
pos % block_size` of a [slots, kv_heads, head_dim] cache. Every kernel here processes the query
heads that share a KV head together (GQA), so one load of a K/V tile serves the whole group, and
scores go through tl.dot with the group's heads (and, for prefill, several tokens) as its rows.

Decode is split-KV (flash-decoding): each sequence's context is cut into fixed TILE-token splits,
computed in parallel, then merged by their log-sum-exp. How a sequence is split depends only on its
own length, so its output is bitwise the same whatever else is in the batch. No launch depends on
the data (grids come from tensor shapes), so both kernels can be captured in a CUDA graph.

Softmax runs in base 2: scores are scaled by log2(e) up front and LSEs are log2-sums.
"""

from __future__ import annotations

import torch

from worker.torch_engine.paged_prefill import paged_prefill_attention
from worker.torch_engine.triton_support import available, dot_settings, pdl_args, tl, triton

if triton is not None:
    from worker.torch_engine.triton_support import attend, wait_for_predecessor

__all__ = ["DECODE_TILE", "available", "paged_decode_attention", "paged_prefill_attention"]

# Tokens per split: the unit of decode parallelism. Longer tiles mean fewer partial results to merge,
# shorter ones more programs for a small batch with long contexts. Changing it changes the numbers.
DECODE_TILE = 256
# Tokens gathered from the block table per inner iteration of a split (divides DECODE_TILE), and warps per
# program by head size. Chosen by `benchmarks/check_paged_attention.py --sweep` on an H200 (Llama-3-8B heads,
# bf16): (256, 128, 4) was the fastest or within 2% of it at batch 1 (context 128 to 4096) and batch 64, and
# 10% faster than (256, 64, 8) at batch 256.
DECODE_SUB_TILE = 128
DECODE_WARPS_SMALL_HEAD = 4  # head_dim <= 64
DECODE_WARPS_LARGE_HEAD = 4


if triton is not None:

    @triton.jit
    def _decode_split_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_out_ptr, part_lse_ptr, block_tables_ptr, context_lens_ptr,
        alibi_ptr, scale, stride_qb, stride_qh, stride_ob, stride_oh, stride_kt, stride_kh, stride_vt, stride_vh,
        stride_table, max_splits,
        GROUP: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, SUB_TILE: tl.constexpr, HAS_ALIBI: tl.constexpr,
        PRECISION: tl.constexpr, WIDEN: tl.constexpr, PDL: tl.constexpr,
    ):
        """One split of one sequence for one KV head's query group: an online softmax over TILE keys."""
        wait_for_predecessor(PDL)
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        context_len = tl.load(context_lens_ptr + seq)
        start = split * TILE
        if start >= context_len:
            return
        end = tl.minimum(start + TILE, context_len)
        rows = tl.arange(0, ROWS)
        heads = kv_head * GROUP + rows
        row_ok = rows < GROUP
        dims = tl.arange(0, DIM_PAD)
        dim_ok = dims < HEAD_DIM
        q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                    mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        qk_scale = scale * 1.4426950408889634  # log2(e): exp2 below
        slopes = tl.zeros([ROWS], tl.float32)
        if HAS_ALIBI:
            slopes = tl.load(alibi_ptr + heads, mask=row_ok, other=0.0).to(tl.float32) * 1.4426950408889634
        query_pos = tl.zeros([ROWS], tl.int32) + context_len - 1
        running_max = tl.full([ROWS], float("-inf"), tl.float32)
        running_sum = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, DIM_PAD], tl.float32)
        for offset in range(start, end, SUB_TILE):
            positions = offset + tl.arange(0, SUB_TILE)
            acc, running_max, running_sum = attend(
                acc, running_max, running_sum, q, k_cache_ptr + kv_head * stride_kh, v_cache_ptr + kv_head * stride_vh,
                stride_kt, stride_vt, block_tables_ptr + seq * stride_table, positions, positions < end, query_pos,
                slopes, qk_scale, dims, dim_ok, BLOCK_SIZE, HAS_ALIBI, PRECISION, WIDEN)
        out = acc / running_sum[:, None]
        store_ok = row_ok[:, None] & dim_ok[None, :]
        if context_len <= TILE:  # a single split is the whole answer: no merge, no fp32 round trip
            tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + dims[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=store_ok)
        else:
            part = (seq * (tl.num_programs(1) * GROUP) + heads).to(tl.int64) * max_splits + split  # [ROWS]
            tl.store(part_out_ptr + part[:, None] * HEAD_DIM + dims[None, :], out, mask=store_ok)
            tl.store(part_lse_ptr + part, running_max + tl.log2(running_sum), mask=row_ok)

    @triton.jit
    def _decode_merge_kernel(
        out_ptr, part_out_ptr, part_lse_ptr, context_lens_ptr, stride_ob, stride_oh, max_splits,
        HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, TILE: tl.constexpr, PDL: tl.constexpr,
    ):
        """One (sequence, query head): the splits' outputs weighted by exp2(their LSE - the largest)."""
        wait_for_predecessor(PDL)
        seq = tl.program_id(0)
        head = tl.program_id(1)
        context_len = tl.load(context_lens_ptr + seq)
        num_splits = tl.cdiv(context_len, TILE)
        if num_splits <= 1:  # written by the split kernel
            return
        base = (seq * tl.num_programs(1) + head).to(tl.int64) * max_splits  # int64: B*Hq*splits*D may pass 2^31
        dims = tl.arange(0, DIM_PAD)
        dim_ok = dims < HEAD_DIM
        top = tl.load(part_lse_ptr + base)
        for split in range(1, num_splits):
            top = tl.maximum(top, tl.load(part_lse_ptr + base + split))
        total = tl.zeros([], tl.float32)
        acc = tl.zeros([DIM_PAD], tl.float32)
        for split in range(num_splits):  # a fixed order: the sum does not depend on the batch
            weight = tl.exp2(tl.load(part_lse_ptr + base + split) - top)
            total += weight
            acc += weight * tl.load(part_out_ptr + (base + split) * HEAD_DIM + dims, mask=dim_ok, other=0.0)
        tl.store(out_ptr + seq * stride_ob + head * stride_oh + dims, (acc / total).to(out_ptr.dtype.element_ty),
                 mask=dim_ok)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, block_size: int, alibi_slopes: torch.Tensor | None = None,
                           scale: float | None = None) -> torch.Tensor:
    """q [B, Hq, D] (one query per sequence); caches [slots, Hkv, D]; returns [B, Hq, D].

    block_tables [B, max_blocks] int32; context_lens [B] int32, each >= 1, counting the current
    token (already in the cache). alibi_slopes: [Hq] ALiBi slopes, or None; scale: None for 1/sqrt(D).
    The grid (B, Hkv, splits) and the fp32 partial buffers [B, Hq, splits, D] are sized by the shape of
    block_tables alone (splits = its width in tokens / DECODE_TILE); programs past a sequence's last
    split exit at once.
    """
    num_seqs, num_q_heads, head_dim = q.shape
    assert q.stride(-1) == k_cache.stride(-1) == v_cache.stride(-1) == 1, "head_dim must be contiguous"
    num_kv_heads = k_cache.shape[1]
    group = num_q_heads // num_kv_heads
    max_splits = triton.cdiv(block_tables.shape[1] * block_size, DECODE_TILE)
    out = torch.empty_like(q)
    part_out = torch.empty(num_seqs, num_q_heads, max_splits, head_dim, device=q.device, dtype=torch.float32)
    part_lse = torch.empty(num_seqs, num_q_heads, max_splits, device=q.device, dtype=torch.float32)
    dim_pad = triton.next_power_of_2(head_dim)
    precision, widen = dot_settings(q.dtype)
    _decode_split_kernel[(num_seqs, num_kv_heads, max_splits)](
        q, k_cache, v_cache, out, part_out, part_lse, block_tables, context_lens,
        q if alibi_slopes is None else alibi_slopes, head_dim**-0.5 if scale is None else scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), block_tables.stride(0), max_splits,
        GROUP=group, ROWS=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, DIM_PAD=dim_pad,
        BLOCK_SIZE=block_size, TILE=DECODE_TILE, SUB_TILE=DECODE_SUB_TILE, HAS_ALIBI=alibi_slopes is not None,
        PRECISION=precision, WIDEN=widen,
        num_warps=DECODE_WARPS_SMALL_HEAD if dim_pad <= 64 else DECODE_WARPS_LARGE_HEAD,
        **pdl_args(q.device, num_seqs),
    )
    _decode_merge_kernel[(num_seqs, num_q_heads)](
        out, part_out, part_lse, context_lens, out.stride(0), out.stride(1), max_splits,
        HEAD_DIM=head_dim, DIM_PAD=dim_pad, TILE=DECODE_TILE, num_warps=1, **pdl_args(q.device, num_seqs),
    )
    return out

