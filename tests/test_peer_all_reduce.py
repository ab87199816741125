"""All-reduce through GPU peer memory at TP=2: NCCL's sums bit for bit, and TP=1's greedy tokens.

Real MPI ranks on two GPUs (skipped with fewer). benchmarks/all_reduce.py reduces the same per-rank
random tensors through NCCL, one-shot and two-shot; benchmarks/tp_decode.py generates greedy fp32
tokens (prompts joining while others decode, CUDA graphs on) at TP=1 and at TP=2 with the peer path.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from services.launcher import find_mpiexec
from tests.processes import child_env

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                reason="needs two CUDA GPUs")


def mpi(ranks: int, script: str, *args: str) -> None:
    subprocess.run([find_mpiexec(""), "-n", str(ranks), sys.executable, str(ROOT / "benchmarks" / script), *args],
                   check=True, cwd=ROOT, timeout=900, env=child_env())


def test_peer_sums_are_nccls_bit_for_bit(tmp_path: Path) -> None:
    out = tmp_path / "all_reduce.json"
    mpi(2, "all_reduce.py", "--tokens", "1,7,64,300", "--out", str(out))
    rows = json.loads(out.read_text())["sizes"]
    checks = {key: value for row in rows for key, value in row.items() if key.endswith("_equals_nccl")}
    assert len(checks) == 4 * 2 * 2 and all(checks.values()), rows  # sizes x dtypes x (one-shot, two-shot)


@pytest.mark.parametrize("fused", [False, True], ids=["peer_all_reduce", "peer_add_norm"])
def test_tp2_with_peer_all_reduce_gives_tp1_float32_tokens(tmp_path: Path, fused: bool) -> None:
    tokens = {}
    for ranks in (1, 2):
        out = tmp_path / f"tp{ranks}.json"
        mpi(ranks, "tp_decode.py", "--model", "random:llama-3-1b", "--dtype", "float32", "--batches", "",
            "--out", str(out), *(["--peer-add-norm"] if fused else []))
        report = json.loads(out.read_text())
        assert report["peer_all_reduce"] == (ranks == 2)
        assert report["peer_add_norm"] == (fused and ranks == 2)
        tokens[ranks] = report["greedy_tokens"]
    assert tokens[2] == tokens[1]
