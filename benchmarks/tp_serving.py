"""The whole stack at a tensor-parallel size, fixed 128/128 at each concurrency: throughput, TTFT and TPOT.

    python benchmarks/tp_serving.py --model random:llama-3-70b --tp 8 --concurrencies 64,256 --out serving.json

For models that only fit across GPUs, where serving.py's single-GPU baselines cannot run. One JSON
line per concurrency, and all of them in --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tokenizers import Tokenizer  # noqa: E402

from benchmarks.loadgen import run_workload  # noqa: E402
from benchmarks.metrics import Slo, summarize  # noqa: E402
from benchmarks.workload import PromptMaker, Workload, fixed_lengths  # noqa: E402
from inflight.model_shapes import SHAPES  # noqa: E402
from tests.stack import ServedStack  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:llama-3-70b")
    parser.add_argument("--tp", type=int, required=True)
    parser.add_argument("--tokenizer", default=".carry/tokenizer", help="folder with tokenizer.json")
    parser.add_argument("--concurrencies", default="64,256")
    parser.add_argument("--waves", type=int, default=2, help="requests per level: this many times its concurrency")
    parser.add_argument("--num-kv-blocks", type=int, default=8192)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    tokenizer = Tokenizer.from_file(str(Path(args.tokenizer) / "tokenizer.json"))
    below = int(SHAPES[args.model.removeprefix("random:")]["vocab_size"])  # type: ignore[call-overload]
    maker = PromptMaker(tokenizer, seed=0, below=below)
    stack = ServedStack("--model", args.model, "--device", "cuda", "--tp", str(args.tp), "--tokenizer", args.tokenizer,
                        "--num-kv-blocks", str(args.num_kv_blocks), "--max-num-batched-tokens", "4096",
                        "--max-num-seqs", "256", "--max-inflight-per-client", "1024",  # one client sends it all
                        "--no-prefix-caching", "--log-level", "warning").wait_ready(timeout=900)
    rows = []
    try:
        asyncio.run(run_workload(stack.address, Workload("warmup", fixed_lengths(maker, 4, 128, 16), concurrency=4),
                                 progress=False))
        for concurrency in [int(c) for c in args.concurrencies.split(",")]:
            workload = Workload("fixed 128/128", fixed_lengths(maker, args.waves * concurrency, 128, 128),
                                concurrency=concurrency)
            records, duration = asyncio.run(run_workload(stack.address, workload, progress=False, channels=4))
            summary = summarize(records, duration, Slo(2.0, 0.1))
            row = {"model": args.model, "tp": args.tp, "concurrency": concurrency, "requests": len(records),
                   "output_tok_s": round(summary["output_throughput_tps"], 1),
                   "ttft_ms_p50": round(summary["ttft_ms"]["p50"], 1), "ttft_ms_p99": round(summary["ttft_ms"]["p99"], 1),
                   "tpot_ms_p50": round(summary["tpot_ms"]["p50"], 2), "failed": summary["failed"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        print(f"stack stopped with exit code {stack.stop()}", flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
