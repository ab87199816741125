"""The fused layer kernels against the eager ops they replace (worker/torch_engine/fused.py).

On a CUDA GPU, or on CPU under Triton's interpreter (TRITON_INTERPRET=1); skipped otherwise.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from worker.torch_engine.fused import add_rms_norm, rope_and_cache, silu_mul
from worker.torch_engine.model import rms_norm
from worker.torch_engine.rope import RotaryTable
from worker.torch_engine.triton_support import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
pytestmark = pytest.mark.skipif(triton is None or (DEVICE == "cpu" and not INTERPRET),
                                reason="needs Triton, and a CUDA GPU or TRITON_INTERPRET=1")
DTYPES = [torch.float32, torch.bfloat16]


def same(got: torch.Tensor, want: torch.Tensor) -> None:
    """Bit for bit, except in bf16 under the interpreter, which rounds conversions to bf16 its own way."""
    if INTERPRET and got.dtype != torch.float32:
        close(got, want)
    else:
        assert torch.equal(got, want)


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    # The kernels round where eager rounds; only a row's sum of squares is added in another order.
    tolerance = 1e-5 if got.dtype == torch.float32 else 3e-2  # bf16: a few ulps (8 bits of mantissa)
    assert torch.allclose(got.float(), want.float(), atol=tolerance, rtol=tolerance), \
        (got.float() - want.float()).abs().max()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 200])
def test_add_rms_norm_is_the_residual_add_then_the_norm(dtype: torch.dtype, hidden: int) -> None:
    gen = torch.Generator().manual_seed(hidden)
    x, residual = (torch.randn(5, hidden, generator=gen).to(DEVICE, dtype) for _ in range(2))
    weight = torch.randn(hidden, generator=gen).to(DEVICE, dtype)
    summed = residual + x
    want = rms_norm(summed.cpu(), weight.cpu(), 1e-5)  # the CPU's fp32 path is torch's own kernel
    got = add_rms_norm(x, residual, weight, 1e-5)
    same(residual, summed)  # updated in place, rounded as eager rounds
    close(got.cpu(), want)
    alone = residual.clone()
    close(add_rms_norm(None, alone, weight, 1e-5).cpu(), want)
    assert torch.equal(alone, residual)  # no x: the residual is left as it is


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_is_silu_of_the_gate_times_up(dtype: torch.dtype) -> None:
    gate_up = torch.randn(3, 2 * 1500, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    close(silu_mul(gate_up), F.silu(gate) * up)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rotary", [True, False])
def test_rope_and_cache_rotates_q_and_k_and_writes_k_and_v(dtype: torch.dtype, rotary: bool) -> None:
    gen = torch.Generator().manual_seed(2)
    heads, kv_heads, dim, tokens = 6, 2, 32, 5
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen).to(DEVICE, dtype)
    positions = torch.tensor([0, 3, 17, 4, 100], device=DEVICE)
    slots = torch.tensor([7, 2, 30, 11, 0], device=DEVICE)
    cache = torch.zeros(2, 40, kv_heads, dim, device=DEVICE, dtype=dtype)
    table = RotaryTable(dim, 10000.0, None, 128, torch.device(DEVICE), dtype) if rotary else None
    q = rope_and_cache(qkv, table.cos if table else None, table.signed_sin if table else None, positions, slots,
                       cache, heads, kv_heads)
    qk = qkv[:, : (heads + kv_heads) * dim].view(tokens, heads + kv_heads, dim)
    if table is not None:
        qk = RotaryTable.apply(qk, *table.at(positions))
    want = torch.zeros_like(cache)
    want[0][slots] = qk[:, heads:]
    want[1][slots] = qkv[:, (heads + kv_heads) * dim :].view(tokens, kv_heads, dim)
    same(q, qk[:, :heads])
    same(cache, want)
