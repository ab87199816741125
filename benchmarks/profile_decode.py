"""Profile a few decode steps of the reference engine (one GPU): where does the step time go?

    python benchmarks/profile_decode.py --model random:llama-3-8b --batch 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from benchmarks.tp_decode import Driver  # noqa: E402
from worker.config import WorkerConfig  # noqa: E402
from worker.parallel import Collectives, ShardPlan  # noqa: E402
from worker.step import Admission  # noqa: E402
from worker.torch_engine.engine import TorchEngine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="random:llama-3-8b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    torch.cuda.set_device(0)
    config = WorkerConfig(model=args.model, listen="", device="cuda", dtype=args.dtype, block_size=16,
                          num_kv_blocks=1024, kv_cache_gb=0, max_num_batched_tokens=2048, max_num_seqs=64,
                          max_model_len=4096, seed=0, log_level="warning")
    engine = TorchEngine(config, ShardPlan(0, 1), Collectives(1))
    engine.warmup()
    driver = Driver(engine)
    admissions = [Admission(f"b{i}", i, 0.0, 1.0, 0, 0) for i in range(args.batch)]
    last = driver.run(admissions, {i: list(range(5, 133)) for i in range(args.batch)})
    for _ in range(5):
        last = driver.run([], {s: [t] for s, t in last.items()})
    torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(10):
        last = driver.run([], {s: [t] for s, t in last.items()})
    torch.cuda.synchronize()
    print(f"plain decode step: {(time.perf_counter() - began) * 100:.2f} ms")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            last = driver.run([], {s: [t] for s, t in last.items()})
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=50))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50))


if __name__ == "__main__":
    main()
