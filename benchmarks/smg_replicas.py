"""N inflight replicas behind SMG on loopback: cache-aware routing against round robin.

Two workloads, each under every policy:
- shared-prefix: G groups, each a long system prompt shared by its requests (a different question
  each), arriving in random group order; the groups' prefixes together overflow one replica's cache;
- unique: prompts of the same length that share nothing.

For each run it reports the replicas' prefix-cache hit rate (their own counters: hit tokens over
prompt tokens), TTFT p50/p99 and throughput as SMG's clients see them, and a plot.

    .venv/bin/python -m benchmarks.smg_replicas --replicas 3 --out benchmarks/results/smg-replicas-cpu
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import subprocess
import time
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from benchmarks.metrics import Slo, summarize
from benchmarks.openai_loadgen import run_openai_workload
from benchmarks.workload import PromptMaker, RequestSpec, Workload, with_poisson_arrivals
from inflight.model_store import resolve_model
from tests.smg_router import SmgRouter
from tests.stack import ServedStack

MODEL = "SmolLM2-135M-Instruct"


def shared_prefix(maker: PromptMaker, groups: int, count: int, prefix_tokens: int, question_tokens: int,
                  output_tokens: int) -> list[RequestSpec]:
    prefixes = [maker.make(prefix_tokens) for _ in range(groups)]
    order = maker.rng.permutation(np.arange(count) % groups)
    return [RequestSpec(prefixes[g] + maker.make(question_tokens), prefix_tokens + question_tokens, output_tokens, 0.0)
            for g in order]


def unique(maker: PromptMaker, count: int, prompt_tokens: int, output_tokens: int) -> list[RequestSpec]:
    return [RequestSpec(maker.make(prompt_tokens), prompt_tokens, output_tokens, 0.0) for _ in range(count)]


def cache_counters(replicas: list[ServedStack]) -> tuple[int, int]:
    stats = [r.stats() for r in replicas]
    return sum(s.prefix_cache_hit_tokens_total for s in stats), sum(s.prompt_tokens_total for s in stats)


def run(router: SmgRouter, replicas: list[ServedStack], workload: Workload) -> dict[str, object]:
    for replica in replicas:
        replica.wait_idle(timeout=120)
    hits_before, prompts_before = cache_counters(replicas)
    records, duration = asyncio.run(run_openai_workload(router.url, MODEL, workload, progress=False))
    hits, prompts = cache_counters(replicas)
    summary = summarize(records, duration, Slo(ttft_seconds=2.0, tpot_seconds=0.2))
    summary["hit_rate"] = (hits - hits_before) / max(1, prompts - prompts_before)
    summary["errors"] = sorted({r.error for r in records if r.error})[:3]
    return summary


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    labels = [f"{r['workload']}\n{r['policy'].split()[0]}" + ("\n(flags)" if " " in r["policy"] else "")
              for r in results]
    x = np.arange(len(results))
    fig.set_size_inches(4.5 * len(results) / 2 + 4, 4)
    axes[0].bar(x - 0.2, [r["summary"]["ttft_ms"]["p50"] for r in results], 0.4, label="p50")
    axes[0].bar(x + 0.2, [r["summary"]["ttft_ms"]["p99"] for r in results], 0.4, label="p99")
    axes[0].set_title("TTFT (ms)")
    axes[0].legend()
    axes[1].bar(x, [100 * r["summary"]["hit_rate"] for r in results])
    axes[1].set_title("prefix-cache hit rate (% of prompt tokens)")
    axes[2].bar(x, [r["summary"]["request_throughput_rps"] for r in results])
    axes[2].set_title("throughput (requests/s)")
    for axis in axes:
        axis.set_xticks(x, labels, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(report: dict) -> str:
    c = report["config"]
    offered = (f"Open loop: Poisson arrivals at {c['request_rate']:g} requests/s" if c.get("request_rate")
               else f"Closed loop at concurrency {c['concurrency']}")
    lines = [
        f"# {c['replicas']} inflight replicas behind SMG: cache_aware against round_robin",
        "",
        f"Host: {report['host']}. Each replica: `inflight serve --num-kv-blocks {c['num_kv_blocks']} --cpu-threads "
        f"{c['cpu_threads']}` (block 16), SmolLM2-135M on CPU; SMG {report['smg_version']} on loopback. "
        f"{offered}, {c['requests']} requests per run, {c['output_tokens']} output tokens each.",
        f"Shared-prefix: {c['groups']} groups of {c['prefix_tokens']}-token system prompts plus "
        f"{c['question_tokens']}-token questions (the groups' prefixes need "
        f"{c['groups'] * c['prefix_tokens'] // 16} blocks; one replica holds {c['num_kv_blocks'] - 1}). "
        f"Unique: {c['prefix_tokens'] + c['question_tokens']}-token prompts sharing nothing.",
        "",
        "| workload | policy | hit rate | TTFT p50 ms | TTFT p99 ms | requests/s | output tok/s | failed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        s = r["summary"]
        lines.append(f"| {r['workload']} | {r['policy']} | {100 * s['hit_rate']:.1f}% | {s['ttft_ms']['p50']:.0f} | "
                     f"{s['ttft_ms']['p99']:.0f} | {s['request_throughput_rps']:.2f} | "
                     f"{s['output_throughput_tps']:.1f} | {s['failed']} |")
    lines += ["", "![TTFT, hit rate and throughput](smg_replicas.png)", "",
              f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--groups", type=int, default=12)
    parser.add_argument("--requests", type=int, default=72)
    parser.add_argument("--prefix-tokens", type=int, default=600)
    parser.add_argument("--question-tokens", type=int, default=24)
    parser.add_argument("--output-tokens", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--request-rate", type=float, default=0.0,
                        help="open loop: Poisson arrivals at this many requests/s instead of a fixed concurrency")
    parser.add_argument("--num-kv-blocks", type=int, default=241)
    parser.add_argument("--cpu-threads", type=int, default=1, help="per replica: the replicas share this host's cores")
    parser.add_argument("--max-num-batched-tokens", type=int, default=1024, help="per replica: a step's token budget")
    parser.add_argument("--workloads", nargs="+", default=["shared-prefix", "unique"],
                        choices=["shared-prefix", "unique"])
    parser.add_argument("--repeat", type=int, default=1, help="runs of each workload under each policy")
    parser.add_argument("--policies", nargs="+",
                        default=["cache_aware", "cache_aware --balance-abs-threshold 1 --balance-rel-threshold 1.5",
                                 "round_robin"],
                        help="SMG policies to compare, each with any further smg launch flags")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/smg-replicas-cpu"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model("smollm2-135m-instruct")
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))

    replicas = [ServedStack("--num-kv-blocks", str(args.num_kv_blocks),
                            "--max-num-batched-tokens", str(args.max_num_batched_tokens),
                            "--cpu-threads", str(args.cpu_threads),
                            log_path=args.out / f"replica-{i}.log") for i in range(args.replicas)]
    results = []
    try:
        for replica in replicas:
            replica.wait_ready()
        for seed, policy in enumerate(args.policies):
            name, *smg_args = shlex.split(policy)
            router = SmgRouter([r.address for r in replicas], model_dir, args.out / f"smg-{seed}.log",
                               policy=name, extra_args=tuple(smg_args)).wait_ready()
            try:
                # Fresh prompts for every run: nothing cached by an earlier run helps this one.
                maker = PromptMaker(tokenizer, seed=100 + seed)
                asyncio.run(run_openai_workload(router.url, MODEL, Workload("warmup", unique(maker, 4, 32, 4), 2),
                                                progress=False))
                workloads = {
                    "shared-prefix": lambda: shared_prefix(maker, args.groups, args.requests, args.prefix_tokens,
                                                           args.question_tokens, args.output_tokens),
                    "unique": lambda: unique(maker, args.requests, args.prefix_tokens + args.question_tokens,
                                             args.output_tokens),
                }
                for run_index, name in enumerate([w for w in args.workloads for _ in range(args.repeat)]):
                    requests = workloads[name]()  # fresh prompts each time
                    started = time.time()
                    if args.request_rate:
                        offered = Workload(name, with_poisson_arrivals(requests, args.request_rate, seed=run_index),
                                           request_rate=args.request_rate)
                    else:
                        offered = Workload(name, requests, concurrency=args.concurrency)
                    summary = run(router, replicas, offered)
                    print(f"{name:14s} {policy:12s} hit {100 * summary['hit_rate']:5.1f}%  TTFT p50 "
                          f"{summary['ttft_ms']['p50']:7.0f} ms p99 {summary['ttft_ms']['p99']:7.0f} ms  "
                          f"{summary['request_throughput_rps']:.2f} req/s  failed {summary['failed']}  "
                          f"({time.time() - started:.0f} s)", flush=True)
                    results.append({"workload": name, "policy": policy, "summary": summary})
            finally:
                router.stop()
    finally:
        for replica in replicas:
            replica.stop()
    smg_version = subprocess.run([router.binary, "--version"], capture_output=True, text=True).stdout.strip()
    report = {"host": f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores",
              "smg_version": smg_version or "from PyPI",
              "config": {k: v for k, v in vars(args).items() if k != "out"} | {"out": str(args.out)},
              "command": "python -m benchmarks.smg_replicas " + " ".join(
                  f"--{k.replace('_', '-')} {' '.join(shlex.quote(p) for p in v) if isinstance(v, list) else v}"
                  for k, v in vars(args).items()),
              "results": results}
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    (args.out / "README.md").write_text(markdown(report))
    plot(results, args.out / "smg_replicas.png")
    print(f"report: {args.out / 'README.md'}")


if __name__ == "__main__":
    main()
