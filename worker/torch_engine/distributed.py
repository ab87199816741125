"""torch.distributed for the tensor all-reduces; its rendezvous address goes out once over MPI."""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist
from mpi4py import MPI


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def init_distributed(comm: MPI.Comm, device: str) -> None:
    """NCCL on CUDA (one GPU per local rank), gloo on CPU."""
    rank, size = comm.Get_rank(), comm.Get_size()
    hosts = comm.allgather(MPI.Get_processor_name())
    if rank == 0:
        host = "127.0.0.1" if len(set(hosts)) == 1 else socket.gethostbyname(socket.gethostname())
        address = f"tcp://{host}:{_free_port()}"
    else:
        address = None
    address = comm.bcast(address, root=0)
    if device == "cuda":
        local_rank = hosts[:rank].count(hosts[rank])
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=address, rank=rank, world_size=size)
