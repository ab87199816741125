"""Serving overhead on a GPU: the stack against the engine alone, overlap scheduling on and off, in one run.

    python benchmarks/stack_overhead.py --model random:llama-3-8b --tokenizer .carry/tokenizer --out OUT

Workloads (closed loop, no prefix caching): fixed 128/128 at concurrency 64 (192 requests) and 256 (512
requests), and the chat-like set at concurrency 64 (128 requests); --scale N runs N times as many. The engine
alone is the scheduler's planner and the worker's engine in this process (benchmarks/baselines.py), stepped
one after another and, in a second pass, pipelined (the next step launched before the last one's tokens are
read); the stack is `inflight serve` (gateway, scheduler, MPI worker) driven over gRPC by
benchmarks/loadgen.py from --client-processes processes (1 by default; more rule the client out as the limit),
with each stack process's CPU use, the steps per second and the mean sequences per step recorded per workload.
Before it is measured, each stack serves the first workload's requests twice over at concurrency 64, from the
same client processes, with rank 0's steps 250..350 under the torch profiler (or, --tracer cupti, CUPTI tracing
each CUDA graph launch as one activity, as Nsight Systems does) and steps 360..460 timed by CUDA events, and
reports how much of that time the GPU ran nothing (worker/step_profiler.py); their cost stays out of the
measured runs. The stacks: overlap scheduling with two steps in flight (the default), with three, off,
and the default with one gateway process instead of two. Each part
(--parts alone,overlap,overlap-3,no-overlap,overlap-1-gateway) is saved as it finishes (OUT/<part>.json), so a
long run may be split across calls on the same machine; OUT/report.json has those present beside the engine
alone.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from benchmarks.baselines import InProcessEngine, TokenizedRequest  # noqa: E402
from benchmarks.loadgen import run_workload, run_workload_in_processes  # noqa: E402
from benchmarks.profile_stack import stack_processes  # noqa: E402
from benchmarks.workload import PromptMaker, Workload, chat_like, fixed_lengths  # noqa: E402
from inflight.model_shapes import SHAPES  # noqa: E402
from tests.stack import ServedStack  # noqa: E402

KV_BLOCKS, BUDGET, MAX_SEQS = 8192, 4096, 256
PROFILED_STEPS = (250, 350)


def workloads(tokenizer: Tokenizer, model: str, scale: int = 1) -> list[Workload]:
    below = int(SHAPES[model.removeprefix("random:")]["vocab_size"])  # type: ignore[call-overload]
    maker = PromptMaker(tokenizer, seed=0, below=below)
    return [Workload("fixed 128/128", fixed_lengths(maker, 192 * scale, 128, 128), concurrency=64),
            Workload("fixed 128/128", fixed_lengths(maker, 512 * scale, 128, 128), concurrency=256),
            Workload("chat-like", chat_like(maker, 128 * scale, 1.0, 1024, 512), concurrency=64)]


def engine_alone(model: str, tokenizer: Tokenizer, runs: list[Workload]) -> dict[str, list[float]]:
    """Each workload through the engine alone, stepped one after another and pipelined, back to back."""
    engine = InProcessEngine(model, "cuda", "auto", KV_BLOCKS, BUDGET, MAX_SEQS)
    results: dict[str, list[float]] = {"tok_s": [], "tok_s_pipelined": []}
    for workload in runs:
        requests = [TokenizedRequest(tokenizer.encode(s.prompt, add_special_tokens=False).ids, s.output_tokens)
                    for s in workload.requests]
        engine.continuous(requests[:8], 8)  # warm up
        results["tok_s"].append(engine.continuous(requests, workload.concurrency).output_throughput_tps)
        results["tok_s_pipelined"].append(engine.continuous(requests, workload.concurrency, pipelined=True)
                                          .output_throughput_tps)
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return results


STACKS = {"overlap": [], "overlap-3": ["--steps-in-flight", "3"], "no-overlap": ["--overlap", "off"],
          "overlap-1-gateway": ["--gateway-processes", "1"]}


def stack(model: str, tokenizer_dir: str, runs: list[Workload], part: str, profile: Path, tracer: str,
          client_processes: int, client_channels: int) -> tuple[list[float], list[dict[str, float]], dict]:
    """Each workload's throughput through one stack, the CPUs each of its processes used meanwhile, and the
    profiled pass's GPU timeline."""
    flags = ["--model", model, "--device", "cuda", "--tokenizer", tokenizer_dir, "--num-kv-blocks", str(KV_BLOCKS),
             "--max-num-batched-tokens", str(BUDGET), "--max-num-seqs", str(MAX_SEQS), "--no-prefix-caching",
             "--max-inflight-per-client", "1024", "--log-level", "warning", *STACKS[part]]
    first, last = PROFILED_STEPS
    served = ServedStack(*flags, "--profile-steps", f"{first}:{last}:{profile}",
                         "--profile-tracer", tracer).wait_ready(timeout=900)
    results, cpus = [], []
    try:
        processes = stack_processes(served.process.pid)
        warmup = Workload("warmup", runs[0].requests[:2], concurrency=2)  # about 130 steps
        asyncio.run(run_workload(served.address, warmup, False))
        profiled = Workload("profiled", runs[0].requests * 2, concurrency=64)  # about 780 steps: 250..460 lie inside
        run_workload_in_processes(served.address, profiled, client_processes, client_channels)
        for workload in runs:
            before = {role: sum(p.cpu_times()[:2]) for role, p in processes.items()}
            stats_before = served.stats()
            records, duration = run_workload_in_processes(served.address, workload, client_processes, client_channels)
            stats = served.stats()
            steps = stats.steps_total - stats_before.steps_total
            cpus.append({**{role: round((sum(p.cpu_times()[:2]) - before[role]) / duration, 2)
                            for role, p in processes.items()},
                         "steps_per_s": round(steps / duration, 1),
                         "mean_batch": round((stats.batched_sequences_total - stats_before.batched_sequences_total)
                                             / max(1, steps), 1)})
            assert all(r.ok for r in records), [r.error for r in records if not r.ok][:3]
            results.append(sum(r.output_tokens for r in records) / duration)
    finally:
        served.stop()
    return results, cpus, json.loads(profile.read_text()) if profile.exists() else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:llama-3-8b")
    parser.add_argument("--tokenizer", required=True, help="folder with tokenizer.json")
    parser.add_argument("--out", required=True)
    parser.add_argument("--parts", default="alone,overlap,overlap-3,no-overlap")
    parser.add_argument("--client-processes", type=int, default=1,
                        help="load generator processes, each with its own channels and share of the load")
    parser.add_argument("--tracer", choices=("torch", "cupti"), default="torch",
                        help="what traces the profiled steps: the torch profiler (every kernel of every CUDA graph) "
                             "or CUPTI at graph granularity, as Nsight Systems does (needs cupti-python)")
    parser.add_argument("--scale", type=int, default=1,
                        help="requests per workload times this (longer runs, steadier figures)")
    parser.add_argument("--client-channels", type=int, default=1,
                        help="connections of each client process (a stack of several gateway processes gets "
                             "connections, not requests, spread over them)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer.from_file(str(Path(args.tokenizer) / "tokenizer.json"))
    runs = workloads(tokenizer, args.model, args.scale)
    for part in args.parts.split(","):
        if part == "alone":
            result: dict = engine_alone(args.model, tokenizer, runs)
        else:
            tok_s, cpus, timeline = stack(args.model, args.tokenizer, runs, part, out / f"profile_{part}.json",
                                          args.tracer, args.client_processes, args.client_channels)
            result = {"tok_s": tok_s, "cpus": cpus, "client_processes": args.client_processes,
                      "client_channels": args.client_channels, "gpu_timeline": timeline}
        (out / f"{part}.json").write_text(json.dumps(result))
        print(part, json.dumps(result), flush=True)
    parts = {part: json.loads((out / f"{part}.json").read_text()) for part in ("alone", *STACKS)
             if (out / f"{part}.json").exists()}
    if "alone" not in parts:
        return
    alone = parts.pop("alone")
    pipelined = alone.get("tok_s_pipelined", [0.0] * len(runs))
    rows = [{"workload": f"{w.name} @ concurrency {w.concurrency}", "engine_alone_tok_s": round(a, 1),
             "engine_alone_pipelined_tok_s": round(q, 1),
             **{f"stack_{part}_tok_s": round(p["tok_s"][i], 1) for part, p in parts.items()},
             **{f"{part}_ratio": round(p["tok_s"][i] / a, 3) for part, p in parts.items()},
             **{f"{part}_ratio_to_pipelined": round(p["tok_s"][i] / q, 3) for part, p in parts.items() if q}}
            for i, (w, a, q) in enumerate(zip(runs, alone["tok_s"], pipelined))]
    report = {"gpu": torch.cuda.get_device_name(), "model": args.model, "rows": rows,
              "stack_cpus": {part: p.get("cpus") for part, p in parts.items()},
              "gpu_timeline": {part: p["gpu_timeline"] for part, p in parts.items()}}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
