"""CPU decode and prefill step times of the engine alone (no gRPC), and where a step's time goes.

    python benchmarks/cpu_step.py                      # embedded SmolLM2, fp32, batch 1/4/16, context 128
    python benchmarks/cpu_step.py --dtype bfloat16 --profile 16
    python benchmarks/cpu_step.py --kernels-ab 5       # the CPU kernels against torch's ops
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from benchmarks.tp_decode import Driver  # noqa: E402
from inflight.model_store import DEFAULT_MODEL, resolve_model  # noqa: E402
from worker.config import WorkerConfig  # noqa: E402
from worker.parallel import Collectives, ShardPlan  # noqa: E402
from worker.step import Admission  # noqa: E402
from worker.torch_engine import cpu_kernels  # noqa: E402
from worker.torch_engine.engine import TorchEngine  # noqa: E402


def make_engine(model: str, dtype: str) -> TorchEngine:
    config = WorkerConfig(model=model, listen="", device="cpu", dtype=dtype, block_size=16, num_kv_blocks=1024,
                          kv_cache_gb=0, max_num_batched_tokens=512, max_num_seqs=64, max_model_len=2048, seed=0,
                          log_level="warning")
    engine = TorchEngine(config, ShardPlan(0, 1), Collectives(1))
    engine.warmup()
    return engine


def decode_steps(engine: TorchEngine, batch: int, context: int, steps: int,
                 watch: contextlib.AbstractContextManager[object] | None = None) -> tuple[list[float], float]:
    """Per-step seconds of `steps` decode steps after a prefill of `context` tokens, and the prefill's.

    watch: entered around the decode steps alone (a profiler), not the prefill."""
    driver = Driver(engine)
    admissions = [Admission(f"b{i}", i, 0.0, 1.0, 0, 0) for i in range(batch)]
    start = time.perf_counter()
    last = driver.run(admissions, {i: [(7 * i + j) % 1000 + 5 for j in range(context)] for i in range(batch)})
    prefill = time.perf_counter() - start
    times = []
    with watch or contextlib.nullcontext():
        for _ in range(steps):
            start = time.perf_counter()
            last = driver.run([], {slot: [token] for slot, token in last.items()})
            times.append(time.perf_counter() - start)
    driver.reset()
    return times, prefill


def kernels_ab(engine: TorchEngine, batches: list[int], context: int, steps: int, rounds: int) -> None:
    """Decode steps and prefills with all of cpu_kernels' kernels, with the attention kernel alone, and with
    torch's ops (gather + SDPA), alternating in this process (so all see the same machine): the median of each
    side's per-round medians. The elementwise kernels apply in bfloat16 only."""
    if not cpu_kernels.available():
        print(f"no CPU kernels built (build them: {cpu_kernels.BUILD_COMMAND}); nothing to compare")
        return
    real = cpu_kernels.attention_applies, cpu_kernels.elementwise_applies
    never = lambda x: False  # noqa: E731
    sides = {"kernels": real, "attention kernel only": (real[0], never), "torch's ops": (never, never)}
    try:
        for batch in batches:
            decode: dict[str, list[float]] = {side: [] for side in sides}
            prefill: dict[str, list[float]] = {side: [] for side in sides}
            for _ in range(rounds):
                for side, (attention, elementwise) in sides.items():
                    cpu_kernels.attention_applies, cpu_kernels.elementwise_applies = attention, elementwise
                    times, prefill_seconds = decode_steps(engine, batch, context, steps)
                    decode[side].append(statistics.median(times) * 1000)
                    prefill[side].append(prefill_seconds * 1000)
            base_decode, base_prefill = statistics.median(decode["torch's ops"]), statistics.median(prefill["torch's ops"])
            for side in sides:
                step, whole = statistics.median(decode[side]), statistics.median(prefill[side])
                print(f"batch {batch:3d}, {side:22s}: decode step {step:6.1f} ms ({base_decode / step:.3f}x), "
                      f"prefill {batch}x{context} {whole:6.0f} ms ({base_prefill / whole:.3f}x)")
    finally:
        cpu_kernels.attention_applies, cpu_kernels.elementwise_applies = real


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--profile", type=int, default=0, help="profile decode steps at this batch size")
    parser.add_argument("--kernels-ab", type=int, default=0, metavar="ROUNDS",
                        help="per batch, alternate the CPU kernels, the attention kernel alone and torch's ops "
                             "for ROUNDS rounds")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model if args.model.startswith("random:") else str(resolve_model(args.model))
    engine = make_engine(model, args.dtype)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, context {args.context}")
    for batch in (int(b) for b in args.batches.split(",")):
        decode_steps(engine, batch, args.context, 4)  # warm up this shape
        times, prefill = decode_steps(engine, batch, args.context, args.steps)
        median = statistics.median(times) * 1000
        print(f"batch {batch:3d}: decode step {median:6.1f} ms (p90 {sorted(times)[int(0.9 * len(times))] * 1000:.1f}),"
              f" {batch / median * 1000:6.1f} tok/s; prefill {batch}x{args.context} {prefill * 1000:.0f} ms")
    if args.kernels_ab:
        kernels_ab(engine, [int(b) for b in args.batches.split(",")], args.context, args.steps, args.kernels_ab)
    if args.profile:
        decode_steps(engine, args.profile, args.context, 4)
        prof = profile(activities=[ProfilerActivity.CPU])
        decode_steps(engine, args.profile, args.context, 8, watch=prof)
        print(f"decode steps only: 8 steps at batch {args.profile}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
