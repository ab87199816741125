"""The kernels of one mixed step (decodes plus a prompt chunk), from the torch profiler (CUDA, eager).

    python benchmarks/profile_step.py --model random:llama-3-8b --decodes 64 --chunk 64

Runs the step without CUDA graphs, so that every kernel shows, and prints one JSON line: kernel
launches and GPU time per kind (GEMMs, attention, fused layer kernels, the rest), and GEMMs per layer.
One forward per step means four GEMMs per layer (qkv, o, gate-up, down) for all of the step's tokens,
plus the head.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from benchmarks.step_mix import MixedSteps  # noqa: E402
from worker.config import WorkerConfig  # noqa: E402
from worker.parallel import Collectives, ShardPlan  # noqa: E402
from worker.torch_engine.engine import TorchEngine  # noqa: E402

KINDS = {  # kind: substrings of kernel names, tried in this order
    "attention": ("_prefill_kernel", "_decode_split_kernel", "_decode_merge_kernel"),
    "fused": ("_add_rms_norm_kernel", "_rope_cache_kernel", "_silu_mul_kernel"),
    "all_reduce": ("all_reduce", "allreduce", "nccl"),
    "gemm_split_k_reduce": ("splitkreduce",),  # the second half of a split-K GEMM
    "gemm": ("gemm", "xmma", "cutlass", "nvjet", "cublas", "_matvec_kernel"),  # the last: matvec.py
}


def kind_of(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, parts in KINDS.items() if any(p.lower() in lowered for p in parts)), "other")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:llama-3-8b")
    parser.add_argument("--decodes", type=int, default=64)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=64)
    args = parser.parse_args()
    torch.cuda.set_device(0)
    config = WorkerConfig(model=args.model, listen="", device="cuda", dtype="bfloat16", block_size=16,
                          num_kv_blocks=4096, kv_cache_gb=0, max_num_batched_tokens=4096,
                          max_num_seqs=args.decodes + 1, max_model_len=4096, seed=0, log_level="warning",
                          cuda_graphs=False)
    engine = TorchEngine(config, ShardPlan(0, 1), Collectives(1))
    engine.warmup()
    mix = MixedSteps(engine, args.decodes, args.context)

    def mixed_step() -> None:
        mix.chunk_step(args.chunk, with_decodes=True)

    mixed_step()  # compile and warm up every kernel of this shape
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        mixed_step()
        torch.cuda.synchronize()
    counts: collections.Counter[str] = collections.Counter()
    names: collections.Counter[str] = collections.Counter()
    micros: collections.Counter[str] = collections.Counter()
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        kind = kind_of(event.name)
        counts[kind] += 1
        micros[kind] += event.time_range.elapsed_us()
        if kind.startswith("gemm"):
            names[event.name[:60]] += 1
    layers = engine.model_config.num_hidden_layers
    print(json.dumps({"gpu": torch.cuda.get_device_name(), "model": args.model, "decodes": args.decodes,
                      "chunk": args.chunk, "layers": layers, "launches": dict(counts),
                      "gpu_ms": {k: round(v / 1000, 2) for k, v in micros.items()},
                      "gemms_per_layer": round((counts["gemm"] - 1) / layers, 2), "gemm_kernels": dict(names)}))


if __name__ == "__main__":
    main()
