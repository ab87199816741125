"""The single-pass paged decode kernel the engine used before split-KV, kept to time against it.

One program per (sequence, KV head) walks the whole context serially, one paged block at a time,
with an online softmax for the GQA group (elementwise products, no tl.dot). CUDA only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, context_lens_ptr, alibi_ptr,
    scale, stride_table, num_kv_heads,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    context_len = tl.load(context_lens_ptr + seq)
    groups = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, HEAD_DIM)
    slots = tl.arange(0, BLOCK_SIZE)
    num_q_heads = num_kv_heads * GROUP
    q_rows = seq * num_q_heads + kv_head * GROUP + groups
    group_ok = groups < GROUP
    q = tl.load(q_ptr + q_rows[:, None] * HEAD_DIM + dims[None, :], mask=group_ok[:, None], other=0.0)
    q = q.to(tl.float32) * scale
    if HAS_ALIBI:
        slopes = tl.load(alibi_ptr + kv_head * GROUP + groups, mask=group_ok, other=0.0).to(tl.float32)
    running_max = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    running_sum = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    num_blocks = tl.cdiv(context_len, BLOCK_SIZE)
    for index in range(num_blocks):
        block = tl.load(block_tables_ptr + seq * stride_table + index)
        positions = index * BLOCK_SIZE + slots
        valid = positions < context_len
        rows = (block * BLOCK_SIZE + slots) * num_kv_heads + kv_head
        k = tl.load(k_cache_ptr + rows[:, None] * HEAD_DIM + dims[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(v_cache_ptr + rows[:, None] * HEAD_DIM + dims[None, :], mask=valid[:, None], other=0.0)
        scores = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)  # [GROUP_PAD, BLOCK_SIZE]
        if HAS_ALIBI:
            scores += slopes[:, None] * (positions - (context_len - 1)).to(tl.float32)[None, :]
        scores = tl.where(valid[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        correction = tl.exp(running_max - new_max)
        weights = tl.exp(scores - new_max[:, None])
        running_sum = running_sum * correction + tl.sum(weights, axis=1)
        acc = acc * correction[:, None] + tl.sum(weights[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        running_max = new_max
    out = acc / running_sum[:, None]
    tl.store(out_ptr + q_rows[:, None] * HEAD_DIM + dims[None, :], out.to(out_ptr.dtype.element_ty),
             mask=group_ok[:, None])


def single_pass_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                       context_lens: torch.Tensor, block_size: int, alibi_slopes: torch.Tensor | None = None,
                       scale: float | None = None) -> torch.Tensor:
    """paged_decode_attention's former body: same arguments, same result."""
    num_seqs, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_q_heads // num_kv_heads
    out = torch.empty_like(q)
    _paged_decode_kernel[(num_seqs, num_kv_heads)](
        q, k_cache, v_cache, out, block_tables, context_lens, q if alibi_slopes is None else alibi_slopes,
        head_dim**-0.5 if scale is None else scale, block_tables.stride(0), num_kv_heads,
        GROUP=group, GROUP_PAD=max(2, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        HAS_ALIBI=alibi_slopes is not None, num_warps=4,
    )
    return out
