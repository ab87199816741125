"""torch.distributed for the tensor all-reduces; its rendezvous address goes out once over MPI.

On one host the ranks meet on loopback. Across hosts they meet at rank 0's address on the network
that reaches the other ranks; a host's own name is no guide to it (Debian maps it to 127.0.1.1, many
containers to 127.0.0.1). INFLIGHT_RENDEZVOUS_ADDRESS overrides the choice; NCCL_SOCKET_IFNAME and
GLOO_SOCKET_IFNAME pick the interfaces NCCL and gloo use after the rendezvous.
"""

from __future__ import annotations

import ipaddress
import os
import socket

import torch
import torch.distributed as dist
from mpi4py import MPI

OVERRIDE = "INFLIGHT_RENDEZVOUS_ADDRESS"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))  # free on every interface, where the other hosts' ranks will connect
        return int(sock.getsockname()[1])


def _route_source(destination: str) -> str | None:
    """The local address this host sends from to reach destination (no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((destination, 9))
            return str(probe.getsockname()[0])
    except OSError:
        return None


def _is_loopback(address: str | None) -> bool:
    return address is None or ipaddress.ip_address(address).is_loopback


def rendezvous_host(hosts: list[str], override: str = "") -> str:
    """Where the other ranks reach rank 0, given each rank's host name (rank 0's first)."""
    if override:
        return override
    peers = [h for h in hosts if h != hosts[0]]
    if not peers:
        return "127.0.0.1"
    try:
        peer = socket.gethostbyname(peers[0])
    except OSError:
        peer = None
    source = None if _is_loopback(peer) else _route_source(peer)  # type: ignore[arg-type]
    if _is_loopback(source):
        source = _route_source("10.254.254.254")  # the default route's source: the host's main address
    if _is_loopback(source):
        raise RuntimeError(f"no network address of this host reaches the ranks on {peers[0]}; set {OVERRIDE}")
    return str(source)


def local_rank(hosts: list[str], rank: int) -> int:
    """This rank's index among the ranks on its own host (which GPU it takes there)."""
    return hosts[:rank].count(hosts[rank])


def init_distributed(comm: MPI.Comm, device: str, hosts: list[str]) -> None:
    """NCCL on CUDA (one GPU per local rank), gloo on CPU; hosts: every rank's processor name."""
    rank, size = comm.Get_rank(), comm.Get_size()
    address = f"tcp://{rendezvous_host(hosts, os.environ.get(OVERRIDE, ''))}:{_free_port()}" if rank == 0 else None
    address = comm.bcast(address, root=0)
    if device == "cuda":
        torch.cuda.set_device(local_rank(hosts, rank) % torch.cuda.device_count())
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=address, rank=rank, world_size=size)
