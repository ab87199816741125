"""Several gateway processes on one port (`inflight serve --gateway-processes N`), and a port already in use."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import grpc
import psutil
import pytest

from inflight.v1 import generation_pb2
from services.client import InflightClient
from tests.stack import REPO, ServedStack, free_port, scrape_metrics

SMALL = ("--num-kv-blocks", "128", "--max-num-batched-tokens", "256")
CONNECTIONS = 16


def gateways(stack: ServedStack) -> list[psutil.Process]:
    return [p for p in psutil.Process(stack.process.pid).children(recursive=True)
            if "services.gateway" in p.cmdline()]


def connections_on(process: psutil.Process, port: int) -> int:
    return sum(1 for c in process.net_connections(kind="tcp")
               if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port)


@pytest.mark.slow
def test_two_gateways_share_the_port_the_load_and_the_metrics():
    metrics_port = free_port()
    stack = ServedStack(*SMALL, "--gateway-processes", "2", "--metrics-port", str(metrics_port)).wait_ready()
    clients: list[InflightClient] = []
    try:
        processes = gateways(stack)
        assert len(processes) == 2
        # Each client its own connection (its own subchannel pool), as separate client machines would have.
        clients = [InflightClient(channel=grpc.insecure_channel(stack.address,
                                                                options=[("grpc.use_local_subchannel_pool", 1)]))
                   for _ in range(CONNECTIONS)]
        request = generation_pb2.GenerateRequest(prompt="The capital of France is", max_tokens=8, ignore_eos=True)
        results = [client.complete(request, timeout=60) for client in clients]
        assert all(r.token_ids == results[0].token_ids and len(r.token_ids) == 8 for r in results)
        # The kernel spread the connections over both processes (all 16 on one: 1 in 2**15), and both served.
        held = [connections_on(p, stack.port) for p in processes]
        assert all(held) and sum(held) >= CONNECTIONS, held

        time.sleep(1.5)  # the scheduler's gauges are polled each second
        metrics = scrape_metrics(metrics_port)
        assert metrics['inflight_requests_total{code="OK",rpc="Generate"}'] == CONNECTIONS
        assert metrics["inflight_generation_tokens_total"] == 8 * CONNECTIONS
        assert metrics["inflight_requests_in_flight"] == 0
        assert metrics["inflight_scheduler_running_requests"] == 0
        assert stack.wait_idle().kv_blocks_free == stack.stats().kv_blocks_total

        # One gateway dies: the whole stack exits non-zero, so that its supervisor starts it again, and leaves
        # nothing behind.
        family = psutil.Process(stack.process.pid).children(recursive=True)
        processes[1].send_signal(signal.SIGKILL)
        assert stack.process.wait(30) == 1
        assert not [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    finally:
        for client in clients:
            client.close()
        stack.stop()


def test_a_port_in_use_stops_the_stack_before_it_starts():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for processes in ("1", "2"):
            done = subprocess.run([sys.executable, "-m", "services.cli", "serve", "--host", "127.0.0.1", "--port",
                                   str(port), "--gateway-processes", processes], cwd=REPO, capture_output=True,
                                  text=True, timeout=60)
            assert done.returncode != 0
            assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
