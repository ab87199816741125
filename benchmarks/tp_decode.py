"""Tensor-parallel check and decode benchmark, straight on the engine (no gRPC).

    mpiexec -n N python benchmarks/tp_decode.py --model random:llama-3-8b --device cuda --out tp.json

Every rank builds the same steps, so the engine and the all-reduces are all that run.
--rank-alone N: one process runs rank 0's slice of a TP=N split with no collective at all (each
all-reduce returns its input), on one GPU: what a TP=N step costs a rank apart from its all-reduces.
Its tokens are meaningless.
Part 1: greedy generation of a few random prompts, batched; the tokens go in the report so
runs at different N can be compared. Part 2: decode step time at the given batch sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from mpi4py import MPI  # noqa: E402

from inflight.step_contract import PREVIOUS_TOKEN  # noqa: E402
from worker.config import WorkerConfig  # noqa: E402
from worker.parallel import Collectives, ShardPlan  # noqa: E402
from worker.step import Admission, PendingStep, Step  # noqa: E402
from worker.torch_engine.engine import TorchEngine  # noqa: E402
from worker.torch_engine.factory import create_torch_engine  # noqa: E402


class RankAlone(Collectives):
    """Rank 0's collectives in a TP=tp_size group of one: every all-reduce is its input, every gather repeats it."""

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_reduce_add_norm(self, partial, residual, weight, eps, add_norm, slot):  # noqa: ANN001, ANN201
        return add_norm(partial, residual, weight, eps)

    def all_gather_last_dim(self, tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        width = max(sizes)
        padded = torch.nn.functional.pad(tensor, (0, width - tensor.shape[-1]))
        return torch.cat([padded[..., :size] for size in sizes], dim=-1)


def build_engine(config: WorkerConfig, comm: MPI.Comm, rank_alone: int = 0) -> TorchEngine:
    """The worker's own setup (devices, torch.distributed, all-reduce), or with rank_alone N, rank 0 of a TP=N
    split in this one process with RankAlone's collectives."""
    if not rank_alone:
        return create_torch_engine(config, comm)
    if config.device == "cuda":
        torch.cuda.set_device(0)
    return TorchEngine(config, ShardPlan(0, rank_alone), RankAlone(rank_alone))


class Driver:
    """Allocates blocks and slots for sequences and runs steps on the engine."""

    def __init__(self, engine: TorchEngine) -> None:
        self.engine = engine
        self.block_size = engine.config.block_size
        self.next_block = 1
        self.step_id = 0
        self.tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}

    def _blocks_for(self, slot: int, new_length: int) -> list[int]:
        have = len(self.tables[slot])
        need = -(-new_length // self.block_size) - have
        blocks = list(range(self.next_block, self.next_block + need))
        self.next_block += need
        self.tables[slot] += blocks
        return blocks

    def run(self, admissions: list[Admission], inputs: dict[int, list[int]]) -> dict[int, int]:
        output = self.launch(admissions, inputs).result()
        return dict(zip(output.slot_ids, output.token_ids))

    def launch(self, admissions: list[Admission], inputs: dict[int, list[int]]) -> PendingStep:
        """A step launched, its output not waited for (PREVIOUS_TOKEN: the token a sequence sampled last)."""
        for admission in admissions:
            self.tables[admission.slot_id] = []
            self.lengths[admission.slot_id] = 0
        slots = list(inputs)
        starts = [self.lengths[slot] for slot in slots]
        new_blocks = [self._blocks_for(slot, start + len(inputs[slot])) for slot, start in zip(slots, starts)]
        for slot, start in zip(slots, starts):
            self.lengths[slot] = start + len(inputs[slot])
        self.step_id += 1

        def ints(values: list[int]) -> np.ndarray:
            return np.array(values, dtype=np.int64)

        step = Step(self.step_id, [], admissions, slot_ids=ints(slots), num_computed_tokens=ints(starts),
                    num_tokens=ints([len(inputs[slot]) for slot in slots]),
                    token_ids=ints([t for slot in slots for t in inputs[slot]]),
                    num_new_blocks=ints([len(blocks) for blocks in new_blocks]),
                    new_block_ids=ints([b for blocks in new_blocks for b in blocks]),
                    sample=np.ones(len(slots), dtype=bool))
        return self.engine.launch(step)

    def reset(self) -> None:
        self.engine.release(list(self.tables))
        self.tables, self.lengths, self.next_block = {}, {}, 1


def greedy(driver: Driver, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """One prompt joins per step while the earlier ones decode, so steps mix prefill and decode."""
    outputs: list[list[int]] = [[] for _ in prompts]
    admitted = 0
    while any(len(out) < new_tokens for out in outputs):
        admissions, inputs = [], {}
        if admitted < len(prompts):
            admissions.append(Admission(f"p{admitted}", admitted, 0.0, 1.0, 0, 0))
            inputs[admitted] = prompts[admitted]
            admitted += 1
        inputs.update({i: [out[-1]] for i, out in enumerate(outputs) if out and len(out) < new_tokens})
        for slot, token in driver.run(admissions, inputs).items():
            outputs[slot].append(token)
    driver.reset()
    return outputs


def decode_step_ms(driver: Driver, batch: int, context: int, steps: int, sync: callable) -> dict[str, float]:
    rng = np.random.default_rng(1)
    vocab = driver.engine.model_config.vocab_size
    admissions = [Admission(f"b{i}", i, 0.0, 1.0, 0, 0) for i in range(batch)]
    prompts = {i: rng.integers(3, vocab, context).tolist() for i in range(batch)}
    # Prefill in pieces that fit the step budget.
    per_step = max(1, driver.engine.config.max_num_batched_tokens // context)
    slots = list(prompts)
    last: dict[int, int] = {}
    for start in range(0, batch, per_step):
        group = slots[start : start + per_step]
        last.update(driver.run([a for a in admissions if a.slot_id in group], {s: prompts[s] for s in group}))
    times = []
    for i in range(steps + 3):
        sync()
        began = time.perf_counter()
        last = driver.run([], {s: [last[s]] for s in slots})
        sync()
        if i >= 3:
            times.append((time.perf_counter() - began) * 1000)
    # Pipelined as the stack serves with overlap scheduling: the next step launched before this one's
    # tokens are read, two in flight, so the host's work per step hides behind the GPU's.
    in_flight: deque[PendingStep] = deque()
    sync()
    began = time.perf_counter()
    for _ in range(steps):
        in_flight.append(driver.launch([], {s: [PREVIOUS_TOKEN] for s in slots}))
        if len(in_flight) == 2:
            in_flight.popleft().result()
    while in_flight:
        in_flight.popleft().result()
    sync()
    pipelined_ms = (time.perf_counter() - began) * 1000 / steps
    driver.reset()
    return {"batch": batch, "context": context, "median_ms": statistics.median(times), "min_ms": min(times),
            "mean_ms": statistics.fmean(times), "pipelined_ms": pipelined_ms}


def prefill_ms(driver: Driver, tokens: int, sync: callable, repeats: int = 3) -> dict[str, float]:
    """One prompt of `tokens` tokens in one step (the step's budget must hold it), median of repeats."""
    rng = np.random.default_rng(2)
    vocab = driver.engine.model_config.vocab_size
    times = []
    for i in range(repeats + 1):
        prompt = rng.integers(3, vocab, tokens).tolist()
        sync()
        began = time.perf_counter()
        driver.run([Admission(f"prefill{i}", 0, 0.0, 1.0, 0, 0)], {0: prompt})
        sync()
        if i:  # the first compiles and warms up this shape
            times.append((time.perf_counter() - began) * 1000)
        driver.reset()
    return {"tokens": tokens, "median_ms": statistics.median(times), "min_ms": min(times)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="random:llama-3-8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--num-kv-blocks", type=int, default=2048)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--contexts", default="128", help="context lengths to time each batch size at")
    parser.add_argument("--max-num-seqs", type=int, default=0, help="default: the largest batch, at least 64")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", required=True)
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--peer-all-reduce", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--peer-add-norm", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--pdl", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--pdl-max-rows", type=int, default=32)
    parser.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--prefill-tokens", type=int, default=0, help="also time one prompt of this many tokens")
    parser.add_argument("--rank-alone", type=int, default=0, metavar="N",
                        help="one process: rank 0's slice of a TP=N split, no collectives (see the docstring)")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",") if b]
    contexts = [int(c) for c in args.contexts.split(",") if c]
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    # Flags away from their defaults only, so that this script still runs in older trees (gpu_engine.sh).
    engine_flags = ("batch_invariant", "peer_all_reduce", "peer_add_norm", "pdl", "pdl_max_rows")
    changed = {name: getattr(args, name) for name in engine_flags if getattr(args, name) != parser.get_default(name)}
    config = WorkerConfig(model=args.model, listen="", device=args.device, dtype=args.dtype, block_size=16,
                          num_kv_blocks=args.num_kv_blocks, kv_cache_gb=0, max_num_batched_tokens=2048,
                          max_num_seqs=args.max_num_seqs or max([64] + batches), max_model_len=4096 + 64, seed=0,
                          log_level="warning", cuda_graphs=args.cuda_graphs, **changed)
    began = time.perf_counter()
    engine = build_engine(config, comm, args.rank_alone)
    engine.warmup()
    load_seconds = time.perf_counter() - began
    sync = (lambda: torch.cuda.synchronize()) if args.device == "cuda" else (lambda: None)
    driver = Driver(engine)
    rng = np.random.default_rng(0)
    vocab = engine.model_config.vocab_size
    prompts = [rng.integers(3, vocab, n).tolist() for n in (17, 64, 100, 33)]
    tokens = greedy(driver, prompts, args.new_tokens)
    fits = [(b, c) for c in contexts for b in batches if b * -(-(c + args.steps + 4) // 16) < args.num_kv_blocks]
    timings = [decode_step_ms(driver, b, c, args.steps, sync) for b, c in fits]
    prefill = prefill_ms(driver, args.prefill_tokens, sync) if args.prefill_tokens else None
    rank_weight_bytes = engine.model.weight_bytes()
    weight_bytes = comm.gather(rank_weight_bytes, root=0)
    floor = None
    if args.device == "cuda":  # this run's own floor: the bytes a rank reads per step at its copy bandwidth
        from benchmarks.serving import measure_bandwidth_gb_s
        bandwidth = measure_bandwidth_gb_s()
        floor = {"copy_bandwidth_gb_s": round(bandwidth, 1),
                 "floor_ms": round(rank_weight_bytes / (bandwidth * 1e9) * 1000, 3)}
        floor = comm.gather(floor, root=0)
    if rank == 0:
        report = {
            "model": args.model, "tp": args.rank_alone or size, "rank_alone": bool(args.rank_alone),
            "device": args.device, "dtype": args.dtype,
            "cuda_graphs": engine.graphs is not None,
            "gpu": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "torch": torch.__version__, "load_seconds": round(load_seconds, 2),
            "peer_all_reduce": getattr(engine.model.collectives, "peer", None) is not None,
            "peer_add_norm": getattr(getattr(engine.model.collectives, "peer", None), "add_norm", None) is not None,
            "batch_invariant": args.batch_invariant,
            "weight_bytes_per_rank": weight_bytes, "floor_per_rank": floor,
            "greedy_tokens": tokens, "decode": timings, "prefill": prefill,
        }
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(json.dumps({k: v for k, v in report.items() if k != "greedy_tokens"}))
    comm.Barrier()
    MPI.Finalize()
    os._exit(0)  # skip NCCL's teardown, which can hang at interpreter exit


if __name__ == "__main__":
    main()
