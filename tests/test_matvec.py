"""The matrix-vector projection kernel (one or two rows) against the products it replaces
(worker/torch_engine/matvec.py).

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
from worker.torch_engine.matvec import MAX_INPUTS, matvec, tiling
from worker.torch_engine.projection import Projection
from worker.torch_engine.sampler import sample
from worker.torch_engine.triton_support import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
pytestmark = pytest.mark.skipif(triton is None or (DEVICE == "cpu" and not INTERPRET),
                                reason="needs Triton, and a CUDA GPU or TRITON_INTERPRET=1")
# (out, in): narrow and wide outputs, rows not a multiple of a program's, inputs not a multiple of its tile
SHAPES = [(4096, 1024), (200, 576), (6144, 1000), (70000, 64)]


def weights(n: int, k: int, dtype: torch.dtype, rows: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(n + k)
    return (torch.randn(n, k, generator=gen).mul_(0.05).to(DEVICE, dtype),
            torch.randn(rows, 2 * k, generator=gen).to(DEVICE, dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("rows", range(1, MAX_INPUTS + 1))
def test_rows_times_the_weight_are_the_product_in_float32_rounded_once(dtype, n, k, rows):
    w, v = weights(n, k, dtype, rows)
    x = v[:, :k]  # rows a stride apart wider than k, as the engine's slices are
    want = F.linear(x.double(), w.double())
    got = matvec(x, w)
    assert got.shape == (rows, n) and got.dtype == dtype
    # Summed in float32 and rounded once: within one half-precision rounding of the exact product.
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    assert ((got.double() - want).abs() <= want.abs() * ulp + 1e-3).all()


@pytest.mark.parametrize("n,k", SHAPES)
def test_a_row_beside_others_is_the_row_alone_bit_for_bit(n, k):
    w, v = weights(n, k, torch.bfloat16, MAX_INPUTS)
    alone = torch.cat([matvec(v[i : i + 1, :k], w, tiles=tiling(n, k)) for i in range(MAX_INPUTS)])
    assert torch.equal(matvec(v[:, :k], w, tiles=tiling(n, k)), alone)


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("rows", range(1, MAX_INPUTS + 1))
def test_silu_mul_read_with_the_weight_is_silu_mul_then_the_product_bit_for_bit(n, k, rows):
    w, gate_up = weights(n, k, torch.bfloat16, rows)
    fused = matvec(gate_up, w, silu_mul=True)
    assert torch.equal(fused, matvec(silu_mul(gate_up), w))


def test_a_half_precision_projection_takes_it_for_one_row_and_two_up_to_a_width():
    w, v = weights(4096, 1024, torch.bfloat16, 3)
    projection = Projection(w, pack_for_cpu=False)
    assert projection.one_row_kernel == projection.two_row_kernel == (DEVICE == "cuda")  # CPU tensors: F.linear
    if projection.one_row_kernel:
        x = v[:, :1024]
        assert torch.equal(projection(x[:1]), matvec(x[:1], w))
        assert torch.equal(projection(x[:2]), matvec(x[:2], w))
        assert torch.equal(projection(x), F.linear(x, w))  # three rows: cuBLAS
        assert torch.equal(projection.after_silu_mul(v[:1]), matvec(silu_mul(v[:1]), w))
        assert torch.equal(projection.after_silu_mul(v[:2]), matvec(silu_mul(v[:2]), w))  # SiLU-mul first
        wide = Projection(torch.cat([w, w[:8]]), pack_for_cpu=False)  # 4104 outputs: two rows read faster by cuBLAS
        assert wide.one_row_kernel and not wide.two_row_kernel
    assert not Projection(w.float(), pack_for_cpu=False).one_row_kernel  # float32 keeps cuBLAS


@pytest.mark.skipif(DEVICE != "cuda", reason="the engine's matrix-vector path runs compiled, on CUDA")
@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("sequences", [1, 2])
def test_a_decode_of_one_or_two_sequences_keeps_the_logits_of_the_unfused_layers(graphs, sequences, monkeypatch):
    """bf16 decode, the same tokens fed to both: through the matrix-vector kernel (for one sequence with
    SiLU-mul read inside the down projection), the sampler's logits are cuBLAS's and the separate SiLU-mul's,
    to bf16 rounding."""

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
            qkv = engine.model.layers[0].qkv
            assert qkv.one_row_kernel == qkv.two_row_kernel == fused
            gen = torch.Generator().manual_seed(0)
            tokens = [torch.randint(3, 500, (40,), generator=gen).tolist() for _ in range(sequences)]
            engine.step(make_step(1, [(s, tokens[s][:20], 0, [2 * s + 1, 2 * s + 2], True) for s in range(sequences)],
                                  admissions=[Admission(f"r{s}", s, 0.0, 1.0, 0, 0) for s in range(sequences)]))
            for position in range(20, 40):
                engine.step(make_step(position, [(s, [tokens[s][position]], position,
                                                  [2 * sequences + s + 1] if position == 32 else [], True)
                                                 for s in range(sequences)]))
            engine.shutdown()
        return recorded

    fused, plain = logits_of_a_decode(True), logits_of_a_decode(False)
    assert len(fused) == len(plain) == 21
    for got, want in zip(fused, plain):
        assert got.shape[0] == sequences
        assert (got - want).abs().max() <= 0.03 * want.abs().max(), (got - want).abs().max()
