"""Start real inflight processes for tests: the whole stack or a gateway alone."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from inflight.v1 import common_pb2
from services.client import InflightClient
from tests.processes import child_env

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def health_status(port: int, service: str = "", timeout: float = 2.0,
                  credentials: grpc.ChannelCredentials | None = None) -> int:
    target = f"localhost:{port}"
    channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    with channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return reply.status


def scrape_metrics(port: int) -> dict[str, float]:
    """The gateway's /metrics, each sample by name and labels (sorted): `name{a="x",b="y"}` or `name`."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


class ServedStack:
    """`inflight serve` in a subprocess, with a client on its port."""

    def __init__(self, *args: str, log_path: Path | None = None, tls: dict[str, bytes] | None = None,
                 token: str | None = None, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.log_path = log_path or Path(os.environ.get("TMPDIR", "/tmp")) / f"inflight-test-{self.port}.log"
        self._log = open(self.log_path, "wb")
        command = [sys.executable, "-m", "services.cli", "serve", "--host", "127.0.0.1",
                   "--port", str(self.port), *args]
        self.process = subprocess.Popen(command, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
                                        start_new_session=True, env=child_env(env))
        self.tls = tls
        self.address = f"localhost:{self.port}" if tls else f"127.0.0.1:{self.port}"
        self.client = self.make_client(token=token)

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls:
            return None
        return grpc.ssl_channel_credentials(self.tls["root"], self.tls.get("key"), self.tls.get("chain"))

    def make_client(self, **kwargs) -> InflightClient:  # type: ignore[no-untyped-def]
        if not self.tls:
            return InflightClient(self.address, **kwargs)
        return InflightClient(self.address, tls_root_certificates=self.tls["root"], tls_private_key=self.tls.get("key"),
                              tls_certificate_chain=self.tls.get("chain"), **kwargs)

    def wait_ready(self, timeout: float = 300.0) -> ServedStack:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"inflight serve exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if health_status(self.port, credentials=self.credentials()) == health_pb2.HealthCheckResponse.SERVING:
                    return self
            except grpc.RpcError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"the stack was not SERVING after {timeout}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stats(self) -> common_pb2.Stats:
        return self.client.stats()

    def wait_idle(self, timeout: float = 20.0) -> common_pb2.Stats:
        """Stats once nothing runs or waits and every block is back (or the last stats at timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            idle = stats.requests_running == 0 and stats.requests_waiting == 0
            if (idle and stats.kv_blocks_free == stats.kv_blocks_total) or time.monotonic() > deadline:
                return stats
            time.sleep(0.1)

    def stop(self, timeout: float = 30.0) -> int:
        self.client.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()
        return self.process.returncode
