"""A weight matrix applied as x @ W.T, with a CPU layout chosen once at load.

On CPU, oneDNN runs a step of several rows (a batch of decodes, a prompt chunk) faster from
weights reordered into its blocked layout than torch's default GEMM does from the plain
[out, in] matrix: SmolLM2 fp32 on 2 cores, a 16-row decode step 75 -> 67 ms. A single row
keeps the plain matrix-vector product, which is faster there. CUDA keeps plain weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class Projection:
    def __init__(self, weight: torch.Tensor, pack_for_cpu: bool) -> None:
        self.weight = weight  # [out, in]
        self.packed: torch.Tensor | None = None
        if pack_for_cpu and weight.device.type == "cpu" and _onednn_available():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 16)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None or x.shape[0] == 1:
            return F.linear(x, self.weight)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()
