"""The feed-forward blocks of the decoders: Llama's gated SiLU MLP, MPT's GELU MLP, Mixtral's experts.

Each returns this rank's partial sum (its slice of the intermediate dimension); the model adds the
ranks' partial sums with one all-reduce.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from worker.torch_engine import cpu_kernels, fused_moe
from worker.torch_engine.projection import Projection
from worker.torch_engine.triton_support import triton


class GatedMlp:
    """down(silu(gate(x)) * up(x)), gate and up in one projection."""

    def __init__(self, gate_up: Projection, down: Projection) -> None:
        self.gate_up, self.down = gate_up, down

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up(x)
        if gate_up.is_cuda and triton is not None:
            return self.down.after_silu_mul(gate_up)
        if cpu_kernels.elementwise_applies(gate_up):  # bfloat16 on CPU: one pass (cpu_elementwise.cpp)
            return self.down(cpu_kernels.silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down(F.silu(gate).mul_(up))

    @property
    def nbytes(self) -> int:
        return self.gate_up.nbytes + self.down.nbytes


class GeluMlp:
    """down(gelu(up(x))), exact GELU (MPT)."""

    def __init__(self, up: Projection, down: Projection) -> None:
        self.up, self.down = up, down

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))

    @property
    def nbytes(self) -> int:
        return self.up.nbytes + self.down.nbytes


class MixtureOfExperts:
    """Mixtral's sparse MLP: a router picks top_k of the experts per token, their outputs mixed by weight.

    Router probabilities are a float32 softmax, and the top_k weights are renormalised to sum to one,
    as transformers computes them. Tokens are grouped by expert (one argsort), and each expert that got
    tokens runs one gated-MLP GEMM over all of them; results are added back in expert order, the
    order transformers adds them in. Each rank holds every expert's slice of the intermediate dimension.
    """

    def __init__(self, router: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, top_k: int) -> None:
        self.router = router    # [experts, hidden]
        self.gate_up = gate_up  # [experts, 2 * intermediate_local, hidden]: w1 rows, then w3 rows
        self.down = down        # [experts, hidden, intermediate_local]
        self.top_k = top_k

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(F.linear(x, self.router).float(), dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        if fused_moe.available(x.device):
            return fused_moe.fused_experts(x, self.gate_up, self.down, weights, experts)
        return loop_experts(x, self.gate_up, self.down, weights, experts)

    @property
    def nbytes(self) -> int:
        return self.touched_nbytes(self.router.shape[0])

    def touched_nbytes(self, experts: int) -> int:
        """Bytes read when `experts` of the experts get tokens (a single token: top_k)."""
        per_expert = sum(t[0].numel() * t.element_size() for t in (self.gate_up, self.down))
        return self.router.numel() * self.router.element_size() + experts * per_expert


def loop_experts(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, topk_weights: torch.Tensor,
                 topk_ids: torch.Tensor) -> torch.Tensor:
    """The experts given the routing ([T, K] weights and ids): tokens grouped by expert with one argsort
    (the counts read on the host), one gated-MLP GEMM pair per expert that got tokens, results added in
    expert order, as transformers adds them."""
    top_k = topk_ids.shape[1]
    weights, choices = topk_weights.flatten(), topk_ids.flatten()
    order = choices.argsort(stable=True)
    counts = torch.bincount(choices, minlength=gate_up.shape[0]).tolist()
    out = torch.zeros_like(x)
    start = 0
    for expert, count in enumerate(counts):
        if not count:
            continue
        picked = order[start : start + count]
        start += count
        tokens = picked // top_k
        gate, up = F.linear(x[tokens], gate_up[expert]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, down[expert])
        out.index_add_(0, tokens, (y * weights[picked, None]).to(x.dtype))
    return out
