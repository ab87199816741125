"""`make bench`: the serving benchmark — the stack under load, and baselines in the same run.

    python benchmarks/serving.py                       # CPU, embedded SmolLM2 (about 10 minutes on 2 cores)
    python benchmarks/serving.py --device cuda --model random:llama-3-8b --preset gpu

Writes benchmarks/results/<label>/report.{json,md} and latency_cdf.png, load_curve.png.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks import report as reporting  # noqa: E402
from benchmarks.baselines import BaselineResult, InProcessEngine, TokenizedRequest, hf_generate  # noqa: E402
from benchmarks.loadgen import run_workload  # noqa: E402
from benchmarks.metrics import Slo, summarize  # noqa: E402
from benchmarks.workload import PromptMaker, Workload, chat_like, fixed_lengths, with_poisson_arrivals  # noqa: E402
from inflight.model_shapes import SHAPES  # noqa: E402
from inflight.model_store import DEFAULT_MODEL, resolve_model  # noqa: E402
from services.text.codec import TextCodec  # noqa: E402
from tests.stack import ServedStack  # noqa: E402

PRESETS = {
    # name: fixed (prompt, output), concurrencies, requests per concurrency, chat scale, rates, chat requests, slo
    "cpu": dict(fixed=(128, 64), concurrencies=(1, 4, 16), per_level=(4, 12, 32), chat_scale=0.4,
                rates=(0.5, 1.0, 2.0, 4.0), chat_requests=24, slo=Slo(2.0, 0.25), kv_blocks=1024, budget=512),
    "smoke": dict(fixed=(16, 4), concurrencies=(1, 2), per_level=(2, 4), chat_scale=0.05, rates=(4.0,),
                  chat_requests=4, slo=Slo(2.0, 0.25), kv_blocks=256, budget=256),
    "gpu": dict(fixed=(128, 128), concurrencies=(1, 16, 64), per_level=(8, 64, 192), chat_scale=1.0,
                rates=(2.0, 8.0, 32.0), chat_requests=128, slo=Slo(0.5, 0.05), kv_blocks=4096, budget=4096),
    # Concurrency 64 only (a big model's quick look): the fixed workload and one chat-like rate.
    "gpu-c64": dict(fixed=(128, 128), concurrencies=(64,), per_level=(192,), chat_scale=1.0,
                    rates=(32.0,), chat_requests=128, slo=Slo(0.5, 0.05), kv_blocks=4096, budget=4096),
}


def git_commit() -> str:
    """HEAD's short hash, or $INFLIGHT_COMMIT where the tree travelled without .git (a GPU host)."""
    if os.environ.get("INFLIGHT_COMMIT"):
        return os.environ["INFLIGHT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} ({torch.cuda.device_count()} GPU), {os.cpu_count()} CPUs"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"


def measure_bandwidth_gb_s() -> float:
    """Device-to-device copy of 2 GiB: bytes read plus written, per second."""
    source = torch.empty(2**30, dtype=torch.float16, device="cuda")
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        target.copy_(source)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / 10
    del source, target
    return 2 * 2**31 / seconds / 1e9


def baseline_table(workload: Workload, stack_summary: dict, continuous: BaselineResult, static: BaselineResult,
                   hf: BaselineResult | None) -> dict:
    stack_tps = stack_summary["output_throughput_tps"]
    rows = [{"name": f"the stack (gRPC, scheduler, MPI worker) at concurrency {workload.concurrency}",
             "output_tokens": sum(r.output_tokens for r in workload.requests), "seconds": stack_summary["duration_s"],
             "output_throughput_tps": stack_tps, "ratio": "1.00"}]
    for result in filter(None, (continuous, static, hf)):
        rows.append({**asdict(result), "output_throughput_tps": result.output_throughput_tps,
                     "ratio": f"{stack_tps / result.output_throughput_tps:.2f}"})
    notes = [f"serving-overhead ratio (stack / engine alone): {stack_tps / continuous.output_throughput_tps:.2f}",
             f"continuous vs static batching (engine alone / static): "
             f"{continuous.output_throughput_tps / static.output_throughput_tps:.2f}"]
    if hf is not None:
        notes.append(f"stack vs transformers generate: {stack_tps / hf.output_throughput_tps:.2f}")
    return {"workload": f"{workload.name}, {len(workload.requests)} requests, concurrency {workload.concurrency}",
            "rows": rows, "notes": notes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--preset", default="", help="cpu or gpu (default: by --device)")
    parser.add_argument("--label", default="", help="results folder name (default: device and model)")
    parser.add_argument("--skip-hf", action="store_true", help="leave out the transformers baseline")
    parser.add_argument("--tokenizer", default="", help="tokenizer folder for random models (default: SmolLM2's)")
    parser.add_argument("--out", default="", help="results folder (default: benchmarks/results/<label>)")
    args = parser.parse_args()
    preset = PRESETS[args.preset or ("gpu" if args.device == "cuda" else "cpu")]
    label = args.label or f"{args.device}-{args.model.replace('random:', 'random-')}"
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / label
    tokenizer_dir = Path(args.tokenizer) if args.tokenizer else resolve_model(DEFAULT_MODEL)
    model_path = args.model if args.model.startswith("random:") else str(resolve_model(args.model))
    codec = TextCodec(tokenizer_dir if args.model.startswith("random:") else Path(model_path))
    # A random shape may have a smaller vocabulary than SmolLM2's tokenizer: prompts keep to its ids.
    below = int(SHAPES[args.model.removeprefix("random:")]["vocab_size"]) if args.model.startswith("random:") else None  # type: ignore[call-overload]
    maker = PromptMaker(codec.tokenizer, seed=0, below=below)
    prompt_len, output_len = preset["fixed"]
    slo: Slo = preset["slo"]

    workloads = [Workload(f"fixed {prompt_len}/{output_len}", fixed_lengths(maker, n, prompt_len, output_len), concurrency=c)
                 for c, n in zip(preset["concurrencies"], preset["per_level"])]
    chat_base = chat_like(maker, preset["chat_requests"], preset["chat_scale"], 1024, 512)
    rate_workloads = [Workload("chat-like", with_poisson_arrivals(chat_base, rate, seed=1), request_rate=rate)
                      for rate in preset["rates"]]
    heaviest = workloads[-1]
    chat_closed = Workload("chat-like", chat_base, concurrency=heaviest.concurrency)

    stack_args = ["--model", args.model, "--device", args.device, "--dtype", args.dtype,
                  "--num-kv-blocks", str(preset["kv_blocks"]), "--max-num-batched-tokens", str(preset["budget"]),
                  "--max-num-seqs", "256", "--no-prefix-caching", "--log-level", "warning",
                  *(["--tokenizer", str(tokenizer_dir)] if args.model.startswith("random:") else [])]
    stack = ServedStack(*stack_args).wait_ready(timeout=900)
    runs = []
    records_by_label = {}
    try:
        asyncio.run(run_workload(stack.address, Workload("warmup", workloads[0].requests[:2], concurrency=2), False))
        for workload in workloads + rate_workloads + [chat_closed]:
            before = stack.stats()
            records, duration = asyncio.run(run_workload(stack.address, workload))
            after = stack.stats()
            steps = after.steps_total - before.steps_total
            summary = summarize(records, duration, slo)
            summary["mean_batch_size"] = (after.batched_sequences_total - before.batched_sequences_total) / max(1, steps)
            runs.append({"workload": workload.name, "offered": workload.offered, "summary": summary})
            records_by_label[f"{workload.name} @ {workload.offered}"] = records
            print(f"{workload.name} @ {workload.offered}: {summary['output_throughput_tps']:.1f} tok/s, "
                  f"TTFT p50 {summary['ttft_ms']['p50']:.0f} ms, TPOT p50 {summary['tpot_ms']['p50']:.1f} ms", flush=True)
    finally:
        stack.stop()

    # Baselines at the heaviest concurrency: the fixed workload, then the chat-like requests (closed loop).
    engine = InProcessEngine(model_path, args.device, args.dtype, preset["kv_blocks"], preset["budget"], 256)
    baseline_sets = []
    for workload, stack_summary in ((heaviest, runs[len(workloads) - 1]["summary"]), (chat_closed, runs[-1]["summary"])):
        tokenized = [TokenizedRequest(codec.encode(r.prompt), r.output_tokens) for r in workload.requests]
        assert all(len(t.prompt_ids) == r.prompt_tokens for t, r in zip(tokenized, workload.requests)), \
            "prompts must have exact token lengths"
        baseline_sets.append((workload, stack_summary, tokenized, engine.continuous(tokenized, workload.concurrency),
                              engine.static(tokenized, workload.concurrency)))
    floor = None
    if args.device == "cuda":
        from benchmarks.tp_decode import Driver, decode_step_ms

        step = decode_step_ms(Driver(engine.engine), 1, prompt_len, 30, torch.cuda.synchronize)
        model = engine.engine.model
        # One sequence reads every dense weight, and of a mixture of experts only the experts it routes to.
        weight_bytes = model.weight_bytes(experts_touched=model.config.num_experts_per_tok or None)
        bandwidth = measure_bandwidth_gb_s()
        floor = {"bandwidth_gb_s": bandwidth, "weight_bytes": weight_bytes,
                 "floor_ms": weight_bytes / (bandwidth * 1e9) * 1000, "step_ms": step["median_ms"]}
    engine.close()
    del engine
    gc.collect()
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    baselines = []
    for workload, stack_summary, tokenized, continuous, static in baseline_sets:
        hf = None if args.skip_hf else hf_generate(model_path, args.device, dtype, tokenized, workload.concurrency)
        baselines.append(baseline_table(workload, stack_summary, continuous, static, hf))

    report = {
        "meta": {"label": label, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "commit": git_commit(), "machine": machine(), "torch": torch.__version__, "model": args.model,
                 "device": args.device, "dtype": args.dtype, "kv_blocks": preset["kv_blocks"],
                 "max_num_batched_tokens": preset["budget"], "prefix_caching": "off (random prompts)",
                 "slo": f"TTFT <= {slo.ttft_seconds * 1000:.0f} ms and TPOT <= {slo.tpot_seconds * 1000:.0f} ms"},
        "stack": runs,
        "baselines": baselines,
    }
    if floor:
        report["decode_floor"] = floor
    report["load_curve_rates"] = list(preset["rates"])
    report["latencies"] = reporting.latencies(records_by_label)
    reporting.write(report, out)
    try:
        reporting.plot(out)
    except ImportError:
        print("matplotlib is missing here: render the plots later with `python benchmarks/report.py DIR`")
    print(reporting.markdown(report))
    print(f"report written to {out}")


if __name__ == "__main__":
    main()
