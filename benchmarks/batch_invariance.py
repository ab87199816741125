"""Batch invariance on the GPU: a sequence's greedy tokens alone, and inside batches of other sequences.

    python benchmarks/batch_invariance.py --model random:llama-3-8b --dtype bfloat16 --out invariance.json

Each target prompt is generated alone (its prompt in one step, then decodes at batch 1), then again
among other sequences: fillers that join before, with and after it, so that its decode steps run at
changing batch sizes (other CUDA-graph buckets) and beside other prompts' chunks. The report gives,
per batch size and target, whether the tokens are the same, and where they first differ.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.tp_decode import Driver  # noqa: E402
from worker.config import WorkerConfig  # noqa: E402
from worker.parallel import Collectives, ShardPlan  # noqa: E402
from worker.step import Admission  # noqa: E402
from worker.torch_engine.engine import TorchEngine  # noqa: E402


def generate(driver: Driver, prompts: dict[int, list[int]], joins: dict[int, int], new_tokens: int,
             budget: int) -> dict[int, list[int]]:
    """Greedy tokens per slot; slot s joins at step joins[s] (or later, when the step's token budget is spent)."""
    outputs: dict[int, list[int]] = {slot: [] for slot in prompts}
    waiting = sorted(prompts, key=lambda slot: joins[slot])
    step = 0
    while any(len(out) < new_tokens for out in outputs.values()):
        inputs = {slot: [out[-1]] for slot, out in outputs.items() if out and len(out) < new_tokens}
        admissions = []
        spent = len(inputs)
        while waiting and joins[waiting[0]] <= step and spent + len(prompts[waiting[0]]) <= budget:
            slot = waiting.pop(0)
            admissions.append(Admission(f"s{slot}", slot, 0.0, 1.0, 0, 0))
            inputs[slot] = prompts[slot]
            spent += len(prompts[slot])
        for slot, token in driver.run(admissions, inputs).items():
            outputs[slot].append(token)
        step += 1
    driver.reset()
    return outputs


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def check(engine: TorchEngine, batches: list[int], new_tokens: int, seed: int = 0) -> dict[str, object]:
    """Targets alone against the same targets inside each batch size; the report's rows."""
    rng = np.random.default_rng(seed)
    vocab = engine.model_config.vocab_size
    budget = engine.config.max_num_batched_tokens
    driver = Driver(engine)
    targets = [rng.integers(3, vocab, n).tolist() for n in (37, 128, 300)]
    alone = [generate(driver, {0: prompt}, {0: 0}, new_tokens, budget)[0] for prompt in targets]
    rows = []
    for batch in batches:
        fillers = batch - len(targets)
        prompts = {slot: prompt for slot, prompt in enumerate(targets)}
        joins = {slot: 4 + 6 * slot for slot in prompts}  # the targets join while fillers decode
        for i in range(fillers):
            slot = len(targets) + i
            prompts[slot] = rng.integers(3, vocab, int(rng.integers(5, 200))).tolist()
            joins[slot] = int(rng.integers(0, new_tokens // 2))  # before, with and after the targets
        together = generate(driver, prompts, joins, new_tokens, budget)
        for index, tokens in enumerate(alone):
            rows.append({"batch": batch, "target": index, "prompt_tokens": len(targets[index]),
                         "identical": together[index] == tokens,
                         "first_difference": first_difference(together[index], tokens)})
    return {"new_tokens": new_tokens, "rows": rows, "all_identical": all(r["identical"] for r in rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:llama-3-8b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batches", default="8,64,160")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    torch.cuda.set_device(0)
    config = WorkerConfig(model=args.model, listen="", device="cuda", dtype=args.dtype, block_size=16,
                          num_kv_blocks=16384, kv_cache_gb=0, max_num_batched_tokens=2048,
                          max_num_seqs=max(batches), max_model_len=4096, seed=0, log_level="warning",
                          cuda_graphs=args.cuda_graphs, batch_invariant=args.batch_invariant)
    engine = TorchEngine(config, ShardPlan(0, 1), Collectives(1))
    engine.warmup()
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "model": args.model,
              "dtype": args.dtype, "cuda_graphs": engine.graphs is not None, "batch_invariant": args.batch_invariant,
              **check(engine, batches, args.new_tokens)}
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}))
    for row in report["rows"]:
        print(json.dumps(row))
    os._exit(0)


if __name__ == "__main__":
    main()
