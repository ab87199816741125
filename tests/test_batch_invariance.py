"""Batch-invariant mode: a row's projection, and a sequence's bfloat16 greedy tokens, whatever else is in the step.

The matmul runs on CUDA, or on CPU under Triton's interpreter (TRITON_INTERPRET=1); the engine test
(64 greedy steps of random Llama-3-1B-shaped weights in bfloat16, alone against inside batches of
up to 40 sequences that join before, with and after it) needs CUDA.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from worker.torch_engine.triton_support import triton

CUDA = torch.cuda.is_available()
INTERPRETED = triton is not None and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
needs_kernels = pytest.mark.skipif(not (CUDA and triton is not None) and not INTERPRETED,
                                   reason="needs CUDA with Triton, or TRITON_INTERPRET=1 with Triton installed")
DEVICE = "cuda" if CUDA else "cpu"


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_are_the_same_alone_and_in_any_batch(dtype: torch.dtype) -> None:
    from worker.torch_engine.invariant_matmul import invariant_matmul

    gen = torch.Generator(device=DEVICE).manual_seed(0)
    weight = torch.randn(200, 192, generator=gen, device=DEVICE).to(dtype)  # columns and inner not tile multiples
    x = torch.randn(150, 192, generator=gen, device=DEVICE).to(dtype)
    full = invariant_matmul(x, weight)
    torch.testing.assert_close(full.float(), F.linear(x.float(), weight.float()),
                               rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-4 if dtype == torch.float32 else 0.3)
    for rows in (slice(0, 1), slice(63, 65), slice(17, 150), slice(149, 150)):
        assert torch.equal(invariant_matmul(x[rows], weight), full[rows])
    assert torch.equal(invariant_matmul(x[::2], weight), full[::2])  # strided rows: copied, same results


@pytest.mark.skipif(not CUDA, reason="the engine's bfloat16 run needs CUDA")
def test_a_sequence_gets_the_same_bfloat16_tokens_alone_and_inside_batches() -> None:
    from benchmarks.batch_invariance import check
    from worker.config import WorkerConfig
    from worker.parallel import Collectives, ShardPlan
    from worker.torch_engine.engine import TorchEngine

    config = WorkerConfig(model="random:llama-3-1b", listen="", device="cuda", dtype="bfloat16", block_size=16,
                          num_kv_blocks=4096, kv_cache_gb=0, max_num_batched_tokens=2048, max_num_seqs=40,
                          max_model_len=1024, seed=0, log_level="warning", batch_invariant=True)
    engine = TorchEngine(config, ShardPlan(0, 1), Collectives(1))
    engine.warmup()
    assert engine.graphs is not None  # decode steps replay graphs of several batch buckets
    report = check(engine, [8, 40], new_tokens=64)
    assert report["all_identical"], report["rows"]


def test_batch_invariant_mode_is_refused_where_it_cannot_hold() -> None:
    """On CPU the engine gathers blocks for SDPA, whose padding depends on the batch: refused at start."""
    from worker.config import WorkerConfig
    from worker.parallel import Collectives, ShardPlan
    from worker.torch_engine.engine import TorchEngine

    config = WorkerConfig(model="random:tiny-gqa", listen="", device="cpu", dtype="float32", block_size=16,
                          num_kv_blocks=64, kv_cache_gb=0, max_num_batched_tokens=128, max_num_seqs=4,
                          max_model_len=256, seed=0, log_level="warning", batch_invariant=True)
    with pytest.raises(ValueError, match="batch-invariant"):
        TorchEngine(config, ShardPlan(0, 1), Collectives(1))


def test_inflight_serve_refuses_batch_invariant_without_a_gpu() -> None:
    """The launcher says why before it starts any process."""
    done = subprocess.run([sys.executable, "-m", "services.cli", "serve", "--batch-invariant"],
                          cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "--batch-invariant needs --device cuda" in done.stderr
