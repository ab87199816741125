"""Where the ranks of a worker group meet: rank 0's routable address, never a loopback one across hosts."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from services.launcher import check_mpi_hosts
from worker.torch_engine.distributed import local_rank, rendezvous_host


def own_address() -> str | None:
    """This machine's main (non-loopback) IPv4 address, if it has a route out."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("10.254.254.254", 9))
            address = probe.getsockname()[0]
    except OSError:
        return None
    return None if ipaddress.ip_address(address).is_loopback else address


def test_ranks_on_one_host_meet_on_loopback() -> None:
    assert rendezvous_host(["node-a", "node-a", "node-a"]) == "127.0.0.1"


def test_ranks_across_hosts_meet_at_the_address_that_routes_to_the_others() -> None:
    address = own_address()
    if address is None:
        pytest.skip("this machine has no non-loopback route")
    # The peer resolves (here, to this machine's own address): rank 0 offers the source of that route.
    assert rendezvous_host([socket.gethostname(), address]) == address
    # A peer whose name does not resolve from rank 0: the default route's source, still not loopback.
    assert rendezvous_host([socket.gethostname(), "peer.invalid"]) == address
    # A host name that resolves to loopback (Debian's 127.0.1.1 entry) is never what rank 0 offers.
    assert not ipaddress.ip_address(rendezvous_host(["node-a", "localhost"])).is_loopback


def test_an_explicit_address_wins() -> None:
    assert rendezvous_host(["node-a", "node-b"], override="10.1.2.3") == "10.1.2.3"


def test_local_rank_counts_the_ranks_before_it_on_its_own_host() -> None:
    hosts = ["a", "a", "b", "b", "a"]
    assert [local_rank(hosts, rank) for rank in range(5)] == [0, 1, 0, 1, 2]


def test_a_host_list_must_start_with_this_host() -> None:
    for local in ("localhost:2,other", f"{socket.gethostname()}:1,other:1", "127.0.0.1"):
        check_mpi_hosts(local)
    with pytest.raises(SystemExit, match="must be this one"):
        check_mpi_hosts("host.invalid:1,localhost:1")
