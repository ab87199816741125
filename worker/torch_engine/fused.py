"""Fused elementwise steps of a decoder layer (Triton; CUDA, or Triton's CPU interpreter in tests).

Eagerly, a layer's norms, rotary embedding, cache writes and gated activation are ~30 small kernels;
in a CUDA graph each still costs a few microseconds, which at small batches is as much as reading
the weights. Here each is one kernel that rounds where eager PyTorch rounds (to the model's dtype
after the residual add, after normalising, after each rotary product), so results differ from the
eager ops only in the order of a row's sum of squares.
"""

from __future__ import annotations

import torch

from worker.torch_engine.triton_support import pdl_args, tl, triton

if triton is not None:
    from worker.torch_engine.triton_support import wait_for_predecessor

    @triton.jit
    def _add_rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, hidden, eps, stride_x, stride_r, stride_o,
                             BLOCK: tl.constexpr, HAS_X: tl.constexpr, PDL: tl.constexpr):
        wait_for_predecessor(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < hidden
        residual = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        if HAS_X:
            x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
            residual = (residual.to(tl.float32) + x.to(tl.float32)).to(residual_ptr.dtype.element_ty)
            tl.store(residual_ptr + row * stride_r + cols, residual, mask=mask)
        r = residual.to(tl.float32)
        variance = tl.sum(r * r, axis=0) / hidden
        normed = (r * tl.rsqrt(variance + eps)).to(out_ptr.dtype.element_ty).to(tl.float32)
        weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_o + cols, (weight * normed).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_mul_kernel(gate_up_ptr, out_ptr, width, stride_in, stride_out, BLOCK: tl.constexpr, PDL: tl.constexpr):
        wait_for_predecessor(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < width
        gate = tl.load(gate_up_ptr + row * stride_in + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(gate_up_ptr + row * stride_in + width + cols, mask=mask, other=0.0).to(tl.float32)
        activated = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + row * stride_out + cols, (activated * up).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_cache_kernel(qkv_ptr, cos_ptr, sin_ptr, positions_ptr, slots_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr,
                           stride_qkv, stride_cos, stride_kt, stride_kh, stride_vt, stride_vh,
                           NUM_Q: tl.constexpr, NUM_KV: tl.constexpr, HEAD_DIM: tl.constexpr,
                           DIM_PAD: tl.constexpr, HAS_ROPE: tl.constexpr, PDL: tl.constexpr):
        """Token t, head h of q then k: rotated (rotate-half) into q_out or the key cache; k's program
        also copies the matching value head into the value cache."""
        wait_for_predecessor(PDL)
        token = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        dims = tl.arange(0, DIM_PAD)
        mask = dims < HEAD_DIM
        row = qkv_ptr + token * stride_qkv + head * HEAD_DIM
        x = tl.load(row + dims, mask=mask, other=0.0)
        if HAS_ROPE:
            partner = tl.load(row + (dims + HEAD_DIM // 2) % HEAD_DIM, mask=mask, other=0.0)
            position = tl.load(positions_ptr + token).to(tl.int64)
            cos = tl.load(cos_ptr + position * stride_cos + dims, mask=mask, other=0.0).to(tl.float32)
            sin = tl.load(sin_ptr + position * stride_cos + dims, mask=mask, other=0.0).to(tl.float32)
            dtype = x.dtype
            straight = (x.to(tl.float32) * cos).to(dtype).to(tl.float32)
            turned = (partner.to(tl.float32) * sin).to(dtype).to(tl.float32)
            x = (straight + turned).to(dtype)
        if head < NUM_Q:
            tl.store(q_out_ptr + (token * NUM_Q + head) * HEAD_DIM + dims, x, mask=mask)
        else:
            slot = tl.load(slots_ptr + token).to(tl.int64)
            kv_head = head - NUM_Q
            tl.store(k_cache_ptr + slot * stride_kt + kv_head * stride_kh + dims, x, mask=mask)
            value = tl.load(qkv_ptr + token * stride_qkv + (NUM_Q + NUM_KV + kv_head) * HEAD_DIM + dims, mask=mask,
                            other=0.0)
            tl.store(v_cache_ptr + slot * stride_vt + kv_head * stride_vh + dims, value, mask=mask)


def add_rms_norm(x: torch.Tensor | None, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """residual += x (in place, rounded to its dtype; skipped when x is None), then Llama's RMSNorm of it."""
    tokens, hidden = residual.shape
    out = torch.empty_like(residual)
    block = triton.next_power_of_2(hidden)
    _add_rms_norm_kernel[(tokens,)](
        residual if x is None else x, residual, weight, out, hidden, eps,
        0 if x is None else x.stride(0), residual.stride(0), out.stride(0),
        BLOCK=block, HAS_X=x is not None, num_warps=min(16, max(1, block // 256)), enable_fp_fusion=False,
        **pdl_args(residual.device, tokens))
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of a [tokens, 2 * width] gate-up projection, as eager SiLU then multiply round."""
    tokens, width = gate_up.shape[0], gate_up.shape[1] // 2
    out = gate_up.new_empty(tokens, width)
    block = 1024
    _silu_mul_kernel[(tokens, triton.cdiv(width, block))](gate_up, out, width, gate_up.stride(0), out.stride(0),
                                                          BLOCK=block, num_warps=4,
                                                          **pdl_args(gate_up.device, tokens))
    return out


def rope_and_cache(qkv: torch.Tensor, cos: torch.Tensor | None, signed_sin: torch.Tensor | None,
                   positions: torch.Tensor, slot_mapping: torch.Tensor, cache: torch.Tensor, num_q_heads: int,
                   num_kv_heads: int) -> torch.Tensor:
    """Queries [T, Hq, D], rotated; rotated keys and the values written into cache [2, slots, Hkv, D].

    qkv [T, (Hq + 2 Hkv) * D] rows (q heads, k heads, v heads); cos / signed_sin: RotaryTable's, or None
    for models without rotary positions (ALiBi).
    """
    tokens, head_dim = qkv.shape[0], cache.shape[-1]
    q = qkv.new_empty(tokens, num_q_heads, head_dim)
    k_cache, v_cache = cache[0], cache[1]
    has_rope = cos is not None
    _rope_cache_kernel[(tokens, num_q_heads + num_kv_heads)](
        qkv, cos if has_rope else qkv, signed_sin if has_rope else qkv, positions, slot_mapping, q, k_cache, v_cache,
        qkv.stride(0), cos.stride(0) if cos is not None else 0, k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1),
        NUM_Q=num_q_heads, NUM_KV=num_kv_heads, HEAD_DIM=head_dim, DIM_PAD=triton.next_power_of_2(head_dim),
        HAS_ROPE=has_rope, num_warps=1, enable_fp_fusion=False,  # each product rounded, as eager rounds it
        **pdl_args(qkv.device, tokens))
    return q
