"""CPU projections: packed (oneDNN) and float32-upcast paths give what F.linear gives."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from worker.torch_engine.projection import WIDE_ROWS, Projection


@pytest.mark.parametrize("rows", [1, 4, WIDE_ROWS, 200])
def test_float32_projection_equals_linear(rows: int) -> None:
    torch.manual_seed(rows)
    weight, x = torch.randn(384, 256), torch.randn(rows, 256)
    projection = Projection(weight, pack_for_cpu=True)
    assert projection.packed is not None  # the CPU wheel has oneDNN
    torch.testing.assert_close(projection(x), F.linear(x, weight), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 4, WIDE_ROWS, 200])
def test_bfloat16_projection_matches_a_float32_reference(rows: int) -> None:
    torch.manual_seed(rows)
    weight, x = torch.randn(384, 256).bfloat16(), torch.randn(rows, 256).bfloat16()
    got = Projection(weight, pack_for_cpu=True)(x)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 384)
    # Every path accumulates in float32 and rounds once to bfloat16.
    torch.testing.assert_close(got.float(), F.linear(x.float(), weight.float()), rtol=1.6e-2, atol=1e-1)


def test_unpacked_projection_is_plain_linear() -> None:
    weight, x = torch.randn(8, 4), torch.randn(3, 4)
    projection = Projection(weight, pack_for_cpu=False)
    assert projection.packed is None and torch.equal(projection(x), F.linear(x, weight))
    assert projection.nbytes == 8 * 4 * 4
