"""The fused peer all-reduce + residual add + RMSNorm kernel (worker/peer_add_norm.py) against add_rms_norm.

Real MPI ranks (benchmarks/peer_add_norm.py). Two: on two GPUs over torch's symmetric memory, on one GPU
over buffers mapped through CUDA IPC with the kernels time-sliced. One: over torch's symmetric memory as
the engine sets it up (its pointer table, its buffer emptied before the rendezvous). Each rank knows every
rank's partials (the same seeds), so the sum is known; runs of calls alternate the buffer's halves with
new data each call, and the normed rows and the updated residual must equal add_rms_norm's of that sum,
bit for bit, and be the same on both ranks. A rank that read a half before its peer had refilled it
(stale rows, or one not emptied) would give another call's sum.
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
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("ranks", [2, 1])
def test_fused_sums_equal_all_reduce_then_add_rms_norm(tmp_path: Path, ranks: int) -> None:
    pytest.importorskip("triton")
    out = tmp_path / "peer_add_norm.json"
    subprocess.run([find_mpiexec(""), "-n", str(ranks), sys.executable, str(ROOT / "benchmarks" / "peer_add_norm.py"),
                    "--rows", "1,5,64,130", "--calls", "8", "--time-rows", "", "--out", str(out)],
                   check=True, cwd=ROOT, timeout=600, env=child_env())
    report = json.loads(out.read_text())
    assert report["ranks"] == ranks
    assert len(report["bits"]) == 2 * 4 and all(report["bits"].values()), report["bits"]
