"""Causal varlen prefill attention over the paged KV cache (Triton, flash-attention style).

A step's queries are packed [T, Hq, D], sequence b owning rows query_start[b]:query_start[b+1].
Its queries are the last q_len of its context_len cached tokens (their K/V already written), so
query i sits at position context_len - q_len + i and sees cache positions 0..its own: earlier
context (a prefix-cache hit, earlier chunks) and this chunk's keys alike come from the cache.

One program handles BLOCK_Q consecutive queries of one sequence for one KV head, with every query
head of that KV head: its BLOCK_M = BLOCK_Q * GROUP_PAD rows are (token, head) pairs, so each K/V tile
is loaded once per group. The grid, cdiv(T, BLOCK_Q) + B tiles by Hkv, depends on shapes only; a
program finds its sequence by binary search over query_start and exits if its tile is past the
sequence's queries (sequence b starts at tile query_start[b] // BLOCK_Q + b, so B extra tiles cover
every sequence's partial last tile).
"""

from __future__ import annotations

import torch

from worker.torch_engine.triton_support import dot_settings, tl, triton

if triton is not None:
    from worker.torch_engine.triton_support import attend

# (BLOCK_M rows = query tokens x group heads, BLOCK_N keys per iteration, num_warps), by head size. Picked so
# that ptxas (sm_90, bf16) needs no register spills; not yet timed on a GPU. tl.dot needs both >= 16.
PREFILL_CONFIG_SMALL_HEAD = (128, 64, 8)  # head_dim <= 64
PREFILL_CONFIG_LARGE_HEAD = (64, 32, 4)


if triton is not None:

    @triton.jit
    def _find_sequence(query_start_ptr, num_seqs, tile, BLOCK_Q: tl.constexpr):
        """The last sequence b whose first tile, query_start[b] // BLOCK_Q + b, is at or before `tile`."""
        low = tl.zeros([], tl.int32)
        high = num_seqs - 1
        while low < high:
            mid = (low + high + 1) // 2
            if tl.load(query_start_ptr + mid) // BLOCK_Q + mid <= tile:
                low = mid
            else:
                high = mid - 1
        return low

    @triton.jit
    def _prefill_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, query_start_ptr, context_lens_ptr, alibi_ptr,
        scale, num_seqs, stride_qt, stride_qh, stride_ot, stride_oh, stride_kt, stride_kh, stride_vt, stride_vh,
        stride_table,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, HAS_ALIBI: tl.constexpr,
        PRECISION: tl.constexpr, WIDEN: tl.constexpr,
    ):
        """BLOCK_Q queries of one sequence with every query head of one KV head: online softmax, causal."""
        tile = tl.program_id(0)
        kv_head = tl.program_id(1)
        seq = _find_sequence(query_start_ptr, num_seqs, tile, BLOCK_Q)
        q_start = tl.load(query_start_ptr + seq)
        q_len = tl.load(query_start_ptr + seq + 1) - q_start
        first = (tile - (q_start // BLOCK_Q + seq)) * BLOCK_Q  # this tile's first query, within the sequence
        if first >= q_len:
            return
        context_len = tl.load(context_lens_ptr + seq)
        prefix = context_len - q_len
        rows = tl.arange(0, BLOCK_Q * GROUP_PAD)
        tokens = first + rows // GROUP_PAD
        heads = kv_head * GROUP + rows % GROUP_PAD
        row_ok = (tokens < q_len) & (rows % GROUP_PAD < GROUP)
        dims = tl.arange(0, DIM_PAD)
        dim_ok = dims < HEAD_DIM
        io_mask = row_ok[:, None] & dim_ok[None, :]
        q = tl.load(q_ptr + (q_start + tokens)[:, None].to(tl.int64) * stride_qt + heads[:, None] * stride_qh
                    + dims[None, :], mask=io_mask, other=0.0)
        # Rows past the sequence's queries get positions past its keys: they see every key, never an empty row.
        query_pos = prefix + tokens
        qk_scale = scale * 1.4426950408889634  # log2(e): exp2 below
        slopes = tl.zeros([BLOCK_Q * GROUP_PAD], tl.float32)
        if HAS_ALIBI:
            slopes = tl.load(alibi_ptr + heads, mask=row_ok, other=0.0).to(tl.float32) * 1.4426950408889634
        running_max = tl.full([BLOCK_Q * GROUP_PAD], float("-inf"), tl.float32)
        running_sum = tl.zeros([BLOCK_Q * GROUP_PAD], tl.float32)
        acc = tl.zeros([BLOCK_Q * GROUP_PAD, DIM_PAD], tl.float32)
        kv_end = prefix + tl.minimum(first + BLOCK_Q, q_len)  # keys past the tile's last query are never seen
        for kv_start in range(0, kv_end, BLOCK_N):
            positions = kv_start + tl.arange(0, BLOCK_N)
            acc, running_max, running_sum = attend(
                acc, running_max, running_sum, q, k_cache_ptr + kv_head * stride_kh, v_cache_ptr + kv_head * stride_vh,
                stride_kt, stride_vt, block_tables_ptr + seq * stride_table, positions, positions < kv_end, query_pos,
                slopes, qk_scale, dims, dim_ok, BLOCK_SIZE, HAS_ALIBI, PRECISION, WIDEN)
        out = acc / running_sum[:, None]
        tl.store(out_ptr + (q_start + tokens)[:, None].to(tl.int64) * stride_ot + heads[:, None] * stride_oh
                 + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=io_mask)


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                            query_start: torch.Tensor, context_lens: torch.Tensor, block_size: int, max_query_len: int,
                            alibi_slopes: torch.Tensor | None = None, scale: float | None = None,
                            out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of packed queries q [T, Hq, D] over the paged caches [slots, Hkv, D]; returns [T, Hq, D].

    block_tables [B, max_blocks] int32; query_start [B + 1] int32, cumulative query counts (T last);
    context_lens [B] int32: cached tokens including this step's (already written). max_query_len: a
    host-side bound on any sequence's query count; it only narrows the query tile when every sequence
    has few queries (decode-heavy steps). alibi_slopes: [Hq] or None; scale: None for 1/sqrt(D).
    out: where to write (at least T rows, rows laid out as q's); rows no sequence covers are left as they were.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    assert q.stride(-1) == k_cache.stride(-1) == v_cache.stride(-1) == 1, "head_dim must be contiguous"
    num_kv_heads = k_cache.shape[1]
    group = num_q_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    dim_pad = triton.next_power_of_2(head_dim)
    block_m, block_n, num_warps = PREFILL_CONFIG_SMALL_HEAD if dim_pad <= 64 else PREFILL_CONFIG_LARGE_HEAD
    # Rows are (token, head) pairs: at least 16 of them for tl.dot, at most what max_query_len needs.
    block_q = max(1, block_m // group_pad)
    block_q = max(min(block_q, triton.next_power_of_2(max(1, max_query_len))), triton.cdiv(16, group_pad))
    num_seqs = block_tables.shape[0]
    precision, widen = dot_settings(q.dtype)
    out = torch.empty_like(q) if out is None else out
    _prefill_kernel[(triton.cdiv(num_tokens, block_q) + num_seqs, num_kv_heads)](
        q, k_cache, v_cache, out, block_tables, query_start, context_lens,
        q if alibi_slopes is None else alibi_slopes, head_dim**-0.5 if scale is None else scale, num_seqs,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), block_tables.stride(0),
        GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q, BLOCK_N=block_n, HEAD_DIM=head_dim, DIM_PAD=dim_pad,
        BLOCK_SIZE=block_size, HAS_ALIBI=alibi_slopes is not None, PRECISION=precision, WIDEN=widen,
        num_warps=num_warps,
    )
    return out
