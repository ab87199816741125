"""Per-step cost of rank 0's broadcast to the other ranks, fixed-layout buffers vs pickles.

    mpiexec -n 2 python benchmarks/fanout.py

A decode step for N sequences: one token each, a new block for one in 16. Times are the
median over many steps of encode + two Bcasts + decode, measured on rank 0 after a barrier.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from mpi4py import MPI  # noqa: E402

from worker.fanout import HEADER_WORDS, decode_step, encode_step  # noqa: E402
from worker.step import Step  # noqa: E402


def decode_step_plan(num_seqs: int, step_id: int) -> Step:
    slots = np.arange(num_seqs, dtype=np.int64)
    grows = (step_id + slots) % 16 == 0
    return Step(step_id, slot_ids=slots, num_computed_tokens=np.full(num_seqs, 500 + step_id, dtype=np.int64),
                num_tokens=np.ones(num_seqs, dtype=np.int64), token_ids=1000 + slots,
                num_new_blocks=grows.astype(np.int64), new_block_ids=slots[grows] * 7 + 1,
                sample=np.ones(num_seqs, dtype=bool))


def fixed_layout(comm: MPI.Comm, step: Step | None) -> Step:
    header = np.empty(HEADER_WORDS, dtype=np.int64)
    if comm.Get_rank() == 0:
        payload = encode_step(step)  # type: ignore[arg-type]
        header[:] = (1, len(payload))
    comm.Bcast(header, root=0)
    if comm.Get_rank() != 0:
        payload = np.empty(int(header[1]), dtype=np.int64)
    comm.Bcast(payload, root=0)
    return step if comm.Get_rank() == 0 else decode_step(payload)  # type: ignore[return-value]


def pickled(comm: MPI.Comm, step: Step | None) -> Step:
    return comm.bcast(step, root=0)


def measure(comm: MPI.Comm, method, num_seqs: int, repeats: int = 300) -> float:  # type: ignore[no-untyped-def]
    times = []
    for i in range(repeats):
        step = decode_step_plan(num_seqs, i) if comm.Get_rank() == 0 else None
        comm.Barrier()
        began = time.perf_counter()
        method(comm, step)
        comm.Barrier()
        times.append(time.perf_counter() - began)
    return statistics.median(times) * 1e6


def main() -> None:
    comm = MPI.COMM_WORLD
    rows = []
    baseline = measure(comm, lambda c, s: None, 1)  # two barriers alone
    for num_seqs in (1, 64, 256, 1024):
        fixed = measure(comm, fixed_layout, num_seqs) - baseline
        pickle = measure(comm, pickled, num_seqs) - baseline
        rows.append({"sequences": num_seqs, "fixed_layout_us": round(fixed, 1), "pickle_us": round(pickle, 1),
                     "payload_bytes": len(encode_step(decode_step_plan(num_seqs, 0))) * 8})
    if comm.Get_rank() == 0:
        print(json.dumps({"ranks": comm.Get_size(), "barrier_pair_us": round(baseline, 1), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
