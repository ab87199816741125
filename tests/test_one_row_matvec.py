"""The batch-1 projection kernel against the products it replaces (worker/torch_engine/one_row_matvec.py).

On a CUDA GPU, or on CPU under Triton's interpreter (TRITON_INTERPRET=1); skipped otherwise.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from tests.steps import make_step
from worker.config import WorkerConfig
from worker.parallel import Collectives, ShardPlan
from worker.step import Admission
from worker.torch_engine import engine as engine_module
from worker.torch_engine import projection as projection_module
from worker.torch_engine.engine import TorchEngine
from worker.torch_engine.fused import silu_mul
from worker.torch_engine.one_row_matvec import one_row_matvec
from worker.torch_engine.projection import Projection
from worker.torch_engine.sampler import sample
from worker.torch_engine.triton_support import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
pytestmark = pytest.mark.skipif(triton is None or (DEVICE == "cpu" and not INTERPRET),
                                reason="needs Triton, and a CUDA GPU or TRITON_INTERPRET=1")
# (out, in): narrow and wide outputs, rows not a multiple of a program's, inputs not a multiple of its tile
SHAPES = [(4096, 1024), (200, 576), (6144, 1000), (70000, 64)]


def weights(n: int, k: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(n + k)
    return (torch.randn(n, k, generator=gen).mul_(0.05).to(DEVICE, dtype),
            torch.randn(1, 2 * k, generator=gen).to(DEVICE, dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", SHAPES)
def test_one_row_times_the_weight_is_the_product_in_float32_rounded_once(dtype, n, k):
    w, v = weights(n, k, dtype)
    x = v[:, :k]
    want = F.linear(x.double(), w.double())
    got = one_row_matvec(x, w)
    assert got.shape == (1, n) and got.dtype == dtype
    # Summed in float32 and rounded once: within one half-precision rounding of the exact product.
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    assert ((got.double() - want).abs() <= want.abs() * ulp + 1e-3).all()


@pytest.mark.parametrize("n,k", SHAPES)
def test_silu_mul_read_with_the_weight_is_silu_mul_then_the_product_bit_for_bit(n, k):
    w, gate_up = weights(n, k, torch.bfloat16)
    fused = one_row_matvec(gate_up, w, silu_mul=True)
    assert torch.equal(fused, one_row_matvec(silu_mul(gate_up), w))


def test_a_half_precision_projection_takes_it_for_one_row_only():
    w, v = weights(4096, 1024, torch.bfloat16)
    projection = Projection(w, pack_for_cpu=False)
    assert projection.one_row_kernel == (DEVICE == "cuda")  # the interpreter's CPU tensors keep F.linear
    if projection.one_row_kernel:
        x = v[:, :1024]
        assert torch.equal(projection(x), one_row_matvec(x, w))
        assert torch.equal(projection.after_silu_mul(v), one_row_matvec(silu_mul(v), w))
    assert not Projection(w.float(), pack_for_cpu=False).one_row_kernel  # float32 keeps cuBLAS


@pytest.mark.skipif(DEVICE != "cuda", reason="the engine's one-row path runs compiled, on CUDA")
@pytest.mark.parametrize("graphs", [False, True])
def test_a_one_sequence_decode_keeps_the_logits_of_the_unfused_layers(graphs, monkeypatch):
    """bf16 decode of one sequence, the same tokens fed to both: through the one-row kernel (SiLU-mul read
    inside the down projection), the sampler's logits are cuBLAS's and the separate SiLU-mul's, to bf16
    rounding."""

    def logits_of_a_decode(fused: bool) -> list[torch.Tensor]:
        recorded: list[torch.Tensor] = []

        def recording_sample(step_logits: torch.Tensor, *args: object) -> object:
            recorded.append(step_logits.float().cpu())
            return sample(step_logits, *args)

        with monkeypatch.context() as patch:
            patch.setattr(engine_module, "sample", recording_sample)
            if not fused:
                patch.setattr(projection_module, "matvec_applies", lambda weight: False)
            config = WorkerConfig(model="random:tiny-gqa", listen="", device="cuda", dtype="bfloat16",
                                  block_size=16, num_kv_blocks=32, kv_cache_gb=0, max_num_batched_tokens=64,
                                  max_num_seqs=4, max_model_len=0, seed=3, log_level="warning", cuda_graphs=graphs)
            engine = TorchEngine(config, ShardPlan(0, 1), Collectives(1))
            engine.warmup()
            assert engine.model.layers[0].qkv.one_row_kernel == fused
            tokens = torch.randint(3, 500, (40,), generator=torch.Generator().manual_seed(0)).tolist()
            engine.step(make_step(1, [(0, tokens[:20], 0, [1, 2], True)],
                                  admissions=[Admission("r0", 0, 0.0, 1.0, 0, 0)]))
            for position in range(20, 40):
                blocks = [3] if position == 32 else []
                engine.step(make_step(position, [(0, [tokens[position]], position, blocks, True)]))
            engine.shutdown()
        return recorded

    fused, plain = logits_of_a_decode(True), logits_of_a_decode(False)
    assert len(fused) == len(plain) == 21
    for got, want in zip(fused, plain):
        assert (got - want).abs().max() <= 0.03 * want.abs().max(), (got - want).abs().max()
