"""All-reduce of a step's activations: NCCL against GPU peer memory (one-shot and two-shot), per call.

    mpiexec -n 2 python benchmarks/all_reduce.py --out all_reduce.json

For each size (tokens x hidden, bfloat16), every method first reduces the same per-rank random
tensors, and the report says whether its sum is bit for bit NCCL's and the same on every rank. Then
it times one call: a CUDA graph of 64 calls in a row (a decode step's two per layer for 32 layers),
replayed, divided by 64; and the same calls launched eagerly.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from mpi4py import MPI  # noqa: E402

from benchmarks.mpi_ranks import end_ranks  # noqa: E402
from worker.peer_all_reduce import PeerAllReduce  # noqa: E402
from worker.torch_engine.distributed import init_distributed  # noqa: E402

CALLS = 64


def nccl(tensor: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(tensor)
    return tensor


def per_call_us(method, inputs: list[torch.Tensor], graphed: bool, repeats: int = 20) -> float:
    """Microseconds per call: CALLS calls in a row, on copies of inputs (so in-place methods keep them)."""
    work = [t.clone() for t in inputs]
    if graphed:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for t in work[:3]:
                method(t)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for t in work:
                method(t)
        run = graph.replay
    else:
        def run() -> None:
            for t in work:
                method(t)
    run()
    torch.cuda.synchronize()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / (repeats * CALLS) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--tokens", default="1,8,32,64,128,256,512,1024,2048")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    init_distributed(comm, "cuda", comm.allgather(MPI.Get_processor_name()))
    device = torch.device("cuda", torch.cuda.current_device())
    sizes = [int(t) for t in args.tokens.split(",")]
    largest = max(sizes) * args.hidden * 4
    one_shot = PeerAllReduce(device, buffer_bytes=largest, one_shot_max_bytes=largest)
    two_shot = PeerAllReduce(device, buffer_bytes=largest, one_shot_max_bytes=0)
    methods = {"nccl": nccl, "one_shot": one_shot, "two_shot": two_shot}
    rows = []
    for tokens in sizes:
        row: dict[str, object] = {"tokens": tokens, "bytes": tokens * args.hidden * 2}
        for dtype in (torch.bfloat16, torch.float32):
            gen = torch.Generator(device=device).manual_seed(1000 + rank)
            data = torch.randn(tokens, args.hidden, generator=gen, device=device).to(dtype)
            expected = nccl(data.clone())
            for name, method in methods.items():
                if name == "nccl" or not method.fits(data):
                    continue
                got = method(data.clone())
                everywhere = comm.allgather(got.float().cpu())
                same_on_ranks = all(torch.equal(everywhere[0], other) for other in everywhere[1:])
                row[f"{name}_{str(dtype)[6:]}_equals_nccl"] = bool(torch.equal(got, expected)) and same_on_ranks
        inputs = [torch.randn(tokens, args.hidden, device=device, dtype=torch.bfloat16) for _ in range(CALLS)]
        for name, method in methods.items():
            if name != "nccl" and not method.fits(inputs[0]):
                continue
            row[f"{name}_graph_us"] = round(per_call_us(method, inputs, graphed=True), 2)
            row[f"{name}_eager_us"] = round(per_call_us(method, inputs, graphed=False), 2)
        rows.append(row)
        if rank == 0:
            print(json.dumps(row), flush=True)
    if rank == 0:
        report = {"gpu": torch.cuda.get_device_name(), "ranks": size, "torch": torch.__version__,
                  "hidden": args.hidden, "calls_per_graph": CALLS, "sizes": rows}
        Path(args.out).write_text(json.dumps(report, indent=1))
    end_ranks(comm)


if __name__ == "__main__":
    main()
