"""The worker's configuration: one typed object, built from the command line."""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerConfig:
    model: str             # a prepared model folder, or random:<shape> for benchmarks
    listen: str            # gRPC address rank 0 serves the scheduler on
    device: str            # cpu or cuda
    dtype: str             # auto (float32 on cpu, bfloat16 on cuda), float32, bfloat16, float16
    block_size: int
    num_kv_blocks: int     # 0: size the cache from kv_cache_gb
    kv_cache_gb: float     # 0: cpu 1 GiB, cuda 85% of what is free after the weights
    max_num_batched_tokens: int
    max_num_seqs: int
    max_model_len: int     # 0: the model's context length
    seed: int              # for random weights
    log_level: str
    keepalive_seconds: float = 20.0  # the scheduler's ping interval; this server accepts pings at half of it
    cuda_graphs: bool = True  # decode steps on CUDA replay captured graphs (with paged decode attention)
    engine: str = "torch"     # a name in worker.engine.ENGINES
    cpu_threads: int = 0      # on cpu, compute threads per rank; 0: this host's usable CPUs over its ranks
    batch_invariant: bool = False  # CUDA: a row's result independent of the rest of its step (slower GEMMs)
    peer_all_reduce: bool = True  # on CUDA with tp > 1, small all-reduces through GPU peer memory, not NCCL
    peer_add_norm: bool = False   # with peer_all_reduce: each all-reduce, residual add and RMSNorm in one kernel
    pdl: bool = True              # Hopper and later: Triton kernels start as programmatic dependents
    pdl_max_rows: int = 32        # the widest launch (rows) that takes PDL
    profile_steps: str = ""       # FIRST:LAST:FILE: rank 0's device timeline over those steps (worker/step_profiler.py)
    profile_tracer: str = "torch"  # with profile_steps: torch (torch.profiler) or cupti (CUDA graph launches)

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--model", required=True)
        parser.add_argument("--listen", default="127.0.0.1:50061")
        parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
        parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
        parser.add_argument("--block-size", type=int, default=16)
        parser.add_argument("--num-kv-blocks", type=int, default=0)
        parser.add_argument("--kv-cache-gb", type=float, default=0.0)
        parser.add_argument("--max-num-batched-tokens", type=int, default=1024)
        parser.add_argument("--max-num-seqs", type=int, default=128)
        parser.add_argument("--max-model-len", type=int, default=0)
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--log-level", default="info")
        parser.add_argument("--keepalive-seconds", type=float, default=20.0)
        parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True)
        parser.add_argument("--engine", default="torch", help="the engine every rank runs (worker/engine.py)")
        parser.add_argument("--cpu-threads", type=int, default=0,
                            help="on cpu, compute threads per rank (0: the host's usable CPUs shared by its ranks)")
        parser.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=False,
                            help="on CUDA, compute every row of a step the same whatever else is in the step, so a "
                                 "sequence's tokens do not depend on its batch (bfloat16); slower projections")
        WorkerConfig.add_kernel_arguments(parser)

    @staticmethod
    def add_kernel_arguments(parser: argparse.ArgumentParser) -> None:
        """The GPU kernel flags, which inflight serve takes too and passes on to the worker as they are."""
        parser.add_argument("--peer-all-reduce", action=argparse.BooleanOptionalAction, default=True,
                            help="on CUDA with several ranks, all-reduce a step's activations through GPU peer memory "
                                 "(NVLink) in one kernel where the GPUs allow it; NCCL otherwise and for large tensors")
        parser.add_argument("--peer-add-norm", action=argparse.BooleanOptionalAction, default=False,
                            help="with --peer-all-reduce: fold each all-reduce with the residual add and RMSNorm "
                                 "after it into one kernel (worker/peer_add_norm.py; not yet timed on two GPUs)")
        parser.add_argument("--pdl", action=argparse.BooleanOptionalAction, default=True,
                            help="on Hopper and later, launch the Triton kernels as programmatic dependents, so each "
                                 "starts while the one before finishes (worker/torch_engine/triton_support.py)")
        parser.add_argument("--pdl-max-rows", type=int, default=32,
                            help="with --pdl: the most rows (sequences of a decode step) a launch may have to take it")
        parser.add_argument("--profile-steps", default="", metavar="FIRST:LAST:FILE",
                            help="CUDA, for benchmarks: trace the device over rank 0's steps FIRST..LAST, time as many "
                                 "again with CUDA events, and write a JSON summary to FILE (worker/step_profiler.py)")
        parser.add_argument("--profile-tracer", default="torch", choices=["torch", "cupti"],
                            help="with --profile-steps: torch.profiler, or CUPTI at CUDA-graph granularity")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> WorkerConfig:
        return cls(**{name: getattr(args, name) for name in cls.__dataclass_fields__})
