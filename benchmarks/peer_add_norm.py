"""The fused peer all-reduce + residual add + RMSNorm (worker/peer_add_norm.py): its bits, then its time per call.

    mpiexec -n 2 python benchmarks/peer_add_norm.py --out peer_add_norm.json

Bits: every rank draws every rank's partials from the same seeds, so each knows the sum the kernel must
give; for several row counts and both dtypes, a run of calls alternating the buffer's halves (new data
each call) must give, bit for bit on every rank, add_rms_norm of that sum: the normed rows and the
updated residual. With fewer GPUs than ranks the ranks share a GPU (torch's symmetric memory wants one
GPU per rank, so the buffers are mapped through CUDA IPC, and the kernels are time-sliced): the bits are
checked, the times are not taken. One rank (`mpiexec -n 1`) checks the kernel over torch's symmetric
memory, as the engine sets it up, on one GPU.

Time: a CUDA graph of 64 calls (a Llama-3-8B decode step's), replayed, per call, against the two-kernel
path the engine takes without it (PeerAllReduce, then add_rms_norm) and against NCCL then add_rms_norm.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from mpi4py import MPI  # noqa: E402

from benchmarks.graph_timing import graphed_calls_us  # noqa: E402
from benchmarks.mpi_ranks import end_ranks  # noqa: E402
from worker.peer_add_norm import PeerAddNorm, fill_empty  # noqa: E402
from worker.peer_all_reduce import PeerAllReduce  # noqa: E402
from worker.torch_engine.distributed import init_distributed  # noqa: E402
from worker.torch_engine.fused import add_rms_norm  # noqa: E402

CALLS = 64
EPS = 1e-5
BUFFER_BYTES = 16 << 20


def ipc_add_norm(comm: MPI.Comm, device: torch.device, buffer_bytes: int, dtype: torch.dtype) -> PeerAddNorm:
    """A PeerAddNorm over buffers each rank allocates and the others map through CUDA IPC."""
    from torch.multiprocessing.reductions import reduce_tensor

    own = torch.empty(buffer_bytes, dtype=torch.uint8, device=device)
    fill_empty(own, dtype)
    torch.cuda.synchronize()
    shared = comm.allgather(reduce_tensor(own))  # after every rank's fill: no rank writes before it
    mapped = [own if r == comm.Get_rank() else rebuild(*args) for r, (rebuild, args) in enumerate(shared)]
    pointers = torch.tensor([b.data_ptr() for b in mapped], dtype=torch.int64, device=device)
    return PeerAddNorm(pointers, comm.Get_rank(), buffer_bytes, dtype, keep=mapped)


def draw(seed: int, rows: int, hidden: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(rows, hidden, generator=gen, device=device).to(dtype)


def check_bits(build: Callable[[torch.dtype], PeerAddNorm], comm: MPI.Comm, hidden: int, device: torch.device,
               rows_list: list[int], calls: int) -> dict[str, bool]:
    rank, size = comm.Get_rank(), comm.Get_size()
    results = {}
    for dtype in (torch.bfloat16, torch.float32):
        fused = build(dtype)
        weight = draw(7, 1, hidden, dtype, device)[0]
        for rows in rows_list:
            ok = True
            residual = draw(11, rows, hidden, dtype, device)
            expected_residual = residual.clone()
            for call in range(calls):
                partials = [draw(1000 * call + r, rows, hidden, dtype, device) for r in range(size)]
                total = torch.zeros(rows, hidden, device=device)
                for part in partials:
                    total += part.float()
                expected = add_rms_norm(total.to(dtype), expected_residual, weight, EPS)
                got = fused(partials[rank], residual, weight, EPS, slot=call % 2)
                ok &= bool(torch.equal(got, expected)) and bool(torch.equal(residual, expected_residual))
            torch.cuda.synchronize()
            everywhere = comm.allgather(residual.float().cpu())
            ok &= all(torch.equal(everywhere[0], other) for other in everywhere[1:])
            results[f"{str(dtype)[6:]}_rows{rows}"] = bool(all(comm.allgather(ok)))
    return results


def time_paths(fused: PeerAddNorm, peer: PeerAllReduce, device: torch.device, hidden: int,
               rows: int) -> dict[str, float]:
    dtype = torch.bfloat16
    weight = torch.randn(hidden, device=device).to(dtype)
    partials = [torch.randn(rows, hidden, device=device).to(dtype) for _ in range(CALLS)]
    residual = torch.randn(rows, hidden, device=device).to(dtype)

    def peer_then_add_norm(part: torch.Tensor) -> None:
        add_rms_norm(peer(part), residual, weight, EPS)

    def nccl_then_add_norm(part: torch.Tensor) -> None:
        reduced = part.clone()
        dist.all_reduce(reduced)
        add_rms_norm(reduced, residual, weight, EPS)

    paths = {
        "fused_us": [functools.partial(fused, part, residual, weight, EPS, slot=index % 2)
                     for index, part in enumerate(partials)],
        "peer_then_add_norm_us": [functools.partial(peer_then_add_norm, part) for part in partials],
        "nccl_then_add_norm_us": [functools.partial(nccl_then_add_norm, part) for part in partials],
    }
    timings = {}
    for name, calls in paths.items():
        dist.barrier()
        timings[name] = round(graphed_calls_us(calls, replays=20), 2)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--rows", default="1,3,64,100")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--time-rows", default="1,8,32,64,128")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    shared_gpu = torch.cuda.device_count() < size  # one rank: torch's symmetric memory over a group of one
    if shared_gpu:
        torch.cuda.set_device(0)
        device = torch.device("cuda", 0)
        build = functools.partial(ipc_add_norm, comm, device, BUFFER_BYTES)
    else:
        init_distributed(comm, "cuda", comm.allgather(MPI.Get_processor_name()))
        device = torch.device("cuda", torch.cuda.current_device())
        build = functools.partial(PeerAddNorm.symmetric, device, BUFFER_BYTES)
    report: dict[str, object] = {"gpu": torch.cuda.get_device_name(), "ranks": size, "shared_gpu": shared_gpu,
                                 "torch": torch.__version__, "hidden": args.hidden}
    report["bits"] = check_bits(build, comm, args.hidden, device, [int(r) for r in args.rows.split(",")], args.calls)
    if rank == 0:
        print(json.dumps(report["bits"]), flush=True)
    if not shared_gpu and size > 1:
        timings = []
        peer = PeerAllReduce(device)
        fused = build(torch.bfloat16)
        for rows in [int(r) for r in args.time_rows.split(",") if r]:
            row = {"rows": rows, **time_paths(fused, peer, device, args.hidden, rows)}
            timings.append(row)
            if rank == 0:
                print(json.dumps(row), flush=True)
        report["per_call"] = timings
    if rank == 0:
        Path(args.out).write_text(json.dumps(report, indent=1))
    end_ranks(comm)


if __name__ == "__main__":
    main()
