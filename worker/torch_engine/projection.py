"""A weight matrix applied as x @ W.T, with a CPU layout chosen once at load.

On CPU, oneDNN runs a step of several rows (a batch of decodes, a prompt chunk) faster from
weights reordered into its blocked layout than torch's default GEMM does from the plain
[out, in] matrix (SmolLM2 fp32 on 2 cores: a 16-row decode step 75 -> 67 ms). A single row
keeps the plain matrix-vector product in float32, which is faster there, and takes the packed
weights in bfloat16, which halve the bytes it reads.

Some CPUs have bfloat16 dot products (AVX512-BF16) but no matrix engine (AMX), and there a
bfloat16 GEMM runs at about half the float32 rate (the CI machine: 184 against 355 GFLOP/s).
Wide steps (prompt chunks, big batches) are bound by arithmetic, not by reading weights, so
there they upcast weights and rows to float32, multiply, and round back: the same accumulation
in float32 that oneDNN's bfloat16 GEMM does, at the float32 rate. A probe at load decides.
CUDA keeps plain weights. There one or two half-precision rows go through a Triton matrix-vector
kernel (matvec.py), and a projection may be batch-invariant (invariant_matmul.py): each row's
result the same whatever the other rows of the step.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from worker.torch_engine.fused import silu_mul
from worker.torch_engine.invariant_matmul import invariant_matmul
from worker.torch_engine.matvec import applies as matvec_applies
from worker.torch_engine.matvec import matvec

# Rows from which a step is bound by arithmetic rather than by reading the weights, on CPU.
WIDE_ROWS = 32
# Outputs up to this wide take the matrix-vector kernel for two rows too; cuBLAS reads wider ones faster there.
MATVEC_TWO_ROWS_MAX_OUT = 4096


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def _seconds(function: Callable[[], object], repeats: int = 5) -> float:
    function()
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return time.perf_counter() - start


@functools.cache
def float32_is_faster_than(dtype: torch.dtype) -> bool:
    """Whether a wide CPU GEMM runs faster upcast to float32 than in dtype (a probe of ~30 ms, once)."""
    x = torch.randn(256, 512)
    w = torch.randn(2048, 512)
    x_low, w_low = x.to(dtype), w.to(dtype)
    packed = torch.ops.mkldnn._reorder_linear_weight(w_low, 256)
    native = _seconds(lambda: torch.ops.mkldnn._linear_pointwise(x_low, packed, None, "none", [], ""))
    upcast = _seconds(lambda: F.linear(x_low.float(), w_low.float()).to(dtype))
    return upcast < 0.85 * native


class Projection:
    def __init__(self, weight: torch.Tensor, pack_for_cpu: bool) -> None:
        self.weight = weight  # [out, in]
        self.packed: torch.Tensor | None = None
        self.wide_in_float32 = False
        self.batch_invariant = False  # CUDA: rows through invariant_matmul rather than cuBLAS
        self.one_row_kernel = matvec_applies(weight)  # CUDA, half precision: a single row through matvec
        self.two_row_kernel = self.one_row_kernel and weight.shape[0] <= MATVEC_TWO_ROWS_MAX_OUT  # and two rows
        if pack_for_cpu and weight.device.type == "cpu" and _onednn_available():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 16)
            self.wide_in_float32 = weight.dtype != torch.float32 and float32_is_faster_than(weight.dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch_invariant:
            return invariant_matmul(x, self.weight)
        if self.one_row_kernel and (x.shape[0] == 1 or x.shape[0] == 2 and self.two_row_kernel):
            return matvec(x, self.weight)
        if self.packed is None:
            return F.linear(x, self.weight)
        rows = x.shape[0]
        if rows == 1 and x.dtype == torch.float32:
            return F.linear(x, self.weight)
        if rows >= WIDE_ROWS and self.wide_in_float32:
            return F.linear(x.float(), self.weight.float()).to(x.dtype)
        return torch.ops.mkldnn._linear_pointwise.default(x, self.packed, None, "none", [], "")

    def after_silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """self(silu(gate) * up) of a gate-up projection's CUDA output: one kernel for a single row."""
        if self.one_row_kernel and not self.batch_invariant and gate_up.shape[0] == 1:
            return matvec(gate_up, self.weight, silu_mul=True)
        return self(silu_mul(gate_up))

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()
