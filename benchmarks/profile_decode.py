"""Where a decode step's time goes on the GPU: kernels by kind, their busy time, and the gaps between them.

    python benchmarks/profile_decode.py --model random:llama-3-8b --batch 1
    mpiexec -n 2 python benchmarks/profile_decode.py --batch 1      # tensor parallel; rank 0 reports

Times plain decode steps (CUDA graphs, as served), then profiles a few of them with the torch
profiler and prints one JSON line: the step's time, kernel launches per step, and GPU time per step
by kind (GEMMs, attention, fused layer kernels, all-reduce, the rest). Step time minus busy time is
the GPU idle inside the step: launch latency and dependency gaps between small kernels.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from mpi4py import MPI  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from benchmarks.profile_step import kind_of  # noqa: E402
from benchmarks.tp_decode import Driver, build_engine  # noqa: E402
from worker.config import WorkerConfig  # noqa: E402
from worker.step import Admission  # noqa: E402

PROFILED = 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:llama-3-8b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--peer-all-reduce", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--top", type=int, default=0, help="also list the N kernels with the most GPU time per step")
    parser.add_argument("--rank-alone", type=int, default=0, metavar="N",
                        help="one process: rank 0's slice of a TP=N split, no collectives (tp_decode.py)")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    config = WorkerConfig(model=args.model, listen="", device="cuda", dtype=args.dtype, block_size=16,
                          num_kv_blocks=4096, kv_cache_gb=0, max_num_batched_tokens=2048,
                          max_num_seqs=max(64, args.batch), max_model_len=4096, seed=0, log_level="warning",
                          peer_all_reduce=args.peer_all_reduce)
    engine = build_engine(config, comm, args.rank_alone)
    engine.warmup()
    driver = Driver(engine)
    admissions = [Admission(f"b{i}", i, 0.0, 1.0, 0, 0) for i in range(args.batch)]
    per_step = max(1, 2048 // args.context)
    last: dict[int, int] = {}
    for start in range(0, args.batch, per_step):
        group = admissions[start : start + per_step]
        last.update(driver.run(group, {a.slot_id: list(range(5, 5 + args.context)) for a in group}))
    for _ in range(5):
        last = driver.run([], {s: [t] for s, t in last.items()})
    torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(20):
        last = driver.run([], {s: [t] for s, t in last.items()})
    torch.cuda.synchronize()
    step_ms = (time.perf_counter() - began) / 20 * 1000
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(PROFILED):
            last = driver.run([], {s: [t] for s, t in last.items()})
        torch.cuda.synchronize()
    counts: collections.Counter[str] = collections.Counter()
    micros: collections.Counter[str] = collections.Counter()
    by_kernel: collections.Counter[str] = collections.Counter()
    launches: collections.Counter[str] = collections.Counter()
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kind = kind_of(event.name)
            counts[kind] += 1
            micros[kind] += event.time_range.elapsed_us()
            by_kernel[event.name[:90]] += event.time_range.elapsed_us()
            launches[event.name[:90]] += 1
    if rank == 0:
        busy = sum(micros.values()) / PROFILED / 1000
        print(json.dumps({
            "gpu": torch.cuda.get_device_name(), "model": args.model, "tp": args.rank_alone or size,
            "rank_alone": bool(args.rank_alone), "batch": args.batch, "context": args.context,
            "peer_all_reduce": engine.model.collectives.peer is not None, "step_ms": round(step_ms, 3),
            "busy_ms": round(busy, 3), "idle_in_step_ms": round(step_ms - busy, 3),
            "launches_per_step": {k: v / PROFILED for k, v in counts.items()},
            "gpu_ms_per_step": {k: round(v / PROFILED / 1000, 3) for k, v in micros.items()},
            # name: [launches per step, GPU us per step]
            "top_kernels": {name: [launches[name] / PROFILED, round(us / PROFILED, 1)]
                            for name, us in by_kernel.most_common(args.top)}}), flush=True)
    comm.Barrier()
    MPI.Finalize()
    os._exit(0)


if __name__ == "__main__":
    main()
