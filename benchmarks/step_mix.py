"""Time steps that carry prompt chunks, alone and beside running decodes (engine only, one device).

    python benchmarks/step_mix.py --device cuda --model random:llama-3-8b
    python benchmarks/step_mix.py --device cpu --dtype float32 --decodes 16 --chunks 16,128

Prints one JSON line: the median time of a decode-only step, of each chunk alone, and of each
chunk beside the decodes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.tp_decode import Driver  # noqa: E402
from inflight.model_store import DEFAULT_MODEL, resolve_model  # noqa: E402
from worker.config import WorkerConfig  # noqa: E402
from worker.parallel import Collectives, ShardPlan  # noqa: E402
from worker.step import Admission  # noqa: E402
from worker.torch_engine.engine import TorchEngine  # noqa: E402


def timed(sync, function, repeats: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        function()
        sync()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


class MixedSteps:
    """Decodes running at a fixed context, and a prompt chunk that joins them for one step at a time."""

    def __init__(self, engine: TorchEngine, decodes: int, context: int) -> None:
        self.engine, self.driver = engine, Driver(engine)
        self.rng = np.random.default_rng(0)
        self.vocab = engine.model_config.vocab_size
        self.decodes = list(range(decodes))
        self.last = self.driver.run([Admission(f"d{i}", i, 0.0, 1.0, 0, 0) for i in self.decodes],
                                    {i: self.rng.integers(3, self.vocab, context).tolist() for i in self.decodes})
        self.chunk_slot = decodes

    def decode_step(self) -> None:
        self.last = self.driver.run([], {s: [self.last[s]] for s in self.decodes})

    def chunk_step(self, size: int, with_decodes: bool) -> None:
        """A fresh size-token prompt in one step, beside every decode or alone; its blocks are reused after."""
        driver, slot = self.driver, self.chunk_slot
        driver.tables[slot], driver.lengths[slot] = [], 0
        inputs = {s: [self.last[s]] for s in self.decodes} if with_decodes else {}
        inputs[slot] = self.rng.integers(3, self.vocab, size).tolist()  # last: its blocks are the newest
        out = driver.run([Admission("c", slot, 0.0, 1.0, 0, 0)], inputs)
        driver.next_block -= len(driver.tables[slot])  # the next chunk reuses them
        if with_decodes:
            self.last = {s: out[s] for s in self.decodes}
        self.engine.release([slot])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--decodes", type=int, default=64)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--chunks", default="16,64,512,2048")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    if args.device == "cuda":
        torch.cuda.set_device(0)
    model = args.model if args.model.startswith("random:") or args.model.startswith("/") else str(resolve_model(args.model))
    config = WorkerConfig(model=model, listen="", device=args.device, dtype=args.dtype, block_size=16,
                          num_kv_blocks=4096, kv_cache_gb=0, max_num_batched_tokens=4096,
                          max_num_seqs=max(64, args.decodes + 1), max_model_len=4096, seed=0, log_level="warning")
    engine = TorchEngine(config, ShardPlan(0, 1), Collectives(1))
    engine.warmup()
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    mix = MixedSteps(engine, args.decodes, args.context)
    decode_step, chunk_step = mix.decode_step, mix.chunk_step

    report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "dtype": args.dtype,
              "decodes": args.decodes, "context": args.context,
              "decode_only_ms": timed(sync, decode_step, args.repeats)}
    for size in (int(c) for c in args.chunks.split(",")):
        timed(sync, lambda: chunk_step(size, False), 2)  # warm up this shape
        report[f"chunk_{size}_alone_ms"] = timed(sync, lambda: chunk_step(size, False), args.repeats)
        report[f"decodes_plus_chunk_{size}_ms"] = timed(sync, lambda: chunk_step(size, True), args.repeats)
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in report.items()}))


if __name__ == "__main__":
    main()
