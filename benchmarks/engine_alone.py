"""The engine alone (planner + engine in one process, no gRPC) on the GPU preset's heaviest workloads.

    python benchmarks/engine_alone.py --model random:llama-3-8b --tokenizer .carry/tokenizer

The same requests as `benchmarks/serving.py --preset gpu` sends at concurrency 64: fixed 128/128
(192 requests) and the chat-like set (128 requests, closed loop). Prints one JSON line. Copied into
an older tree, it times that tree's engine the same way (gpu_engine.sh does this for A/B runs).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from benchmarks.baselines import InProcessEngine, TokenizedRequest  # noqa: E402
from benchmarks.workload import PromptMaker, chat_like, fixed_lengths  # noqa: E402
from inflight.model_shapes import SHAPES  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:llama-3-8b")
    parser.add_argument("--tokenizer", required=True, help="folder with tokenizer.json")
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    tokenizer = Tokenizer.from_file(str(Path(args.tokenizer) / "tokenizer.json"))
    below = int(SHAPES[args.model.removeprefix("random:")]["vocab_size"])  # type: ignore[call-overload]
    maker = PromptMaker(tokenizer, seed=0, below=below)
    workloads = {"fixed 128/128": fixed_lengths(maker, 192, 128, 128), "chat-like": chat_like(maker, 128, 1.0, 1024, 512)}
    engine = InProcessEngine(args.model, "cuda", "auto", 4096, 4096, 256)
    report: dict[str, object] = {"gpu": torch.cuda.get_device_name(), "model": args.model,
                                 "concurrency": args.concurrency}
    for name, specs in workloads.items():
        requests = [TokenizedRequest(tokenizer.encode(s.prompt, add_special_tokens=False).ids, s.output_tokens)
                    for s in specs]
        engine.continuous(requests[:8], 8)  # warm up
        result = engine.continuous(requests, args.concurrency)
        report[name] = {"output_tok_s": round(result.output_throughput_tps, 1), "steps": result.steps,
                        "seconds": round(result.seconds, 2)}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
