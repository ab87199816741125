"""Health is NOT_SERVING until the scheduler and the worker are ready, then SERVING."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from inflight.v1 import generation_pb2
from services.client import InflightClient
from tests.processes import child_env
from tests.stack import REPO, free_port, health_status

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def spawn(*args: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen([*args], cwd=REPO, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
                            env=child_env())


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return True
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    return False


@pytest.mark.slow
def test_health_turns_serving_only_once_scheduler_and_worker_are_ready(model_dir, tmp_path):
    port = free_port()
    scheduler_address = f"unix://{tmp_path}/scheduler.sock"
    worker_address = f"unix://{tmp_path}/worker.sock"
    python = sys.executable
    processes = [
        spawn(python, "-m", "services.gateway", "--model", str(model_dir), "--scheduler", scheduler_address,
              "--host", "127.0.0.1", "--port", str(port), log=tmp_path / "gateway.log"),
    ]
    try:
        assert wait_for(lambda: health_status(port) == NOT_SERVING, 30)
        with InflightClient(f"127.0.0.1:{port}") as client:
            request = generation_pb2.GenerateRequest(prompt="hello", max_tokens=4)
            with pytest.raises(grpc.RpcError) as raised:
                client.complete(request, timeout=10)
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE

            # A call made now is retried by the client (UNAVAILABLE, no token yet) until the stack is up.
            retrying = InflightClient(f"127.0.0.1:{port}", retries=9)
            retried: dict[str, object] = {}
            caller = threading.Thread(target=lambda: retried.update(result=retrying.complete(request, timeout=60)))
            caller.start()

            processes.append(spawn(python, "-m", "scheduler", "--worker", worker_address, "--listen",
                                   scheduler_address, log=tmp_path / "scheduler.log"))
            time.sleep(2.0)  # the scheduler is up, but has no worker yet
            assert health_status(port) == NOT_SERVING
            assert health_status(port, "inflight.v1.Generation") == NOT_SERVING

            mpiexec = str(Path(python).parent / "mpiexec")
            processes.append(spawn(mpiexec, "-n", "1", python, "-m", "worker", "--model", str(model_dir),
                                   "--listen", worker_address, "--num-kv-blocks", "64",
                                   "--max-num-batched-tokens", "256", log=tmp_path / "worker.log"))
            assert wait_for(lambda: health_status(port) == SERVING, 180), (tmp_path / "scheduler.log").read_text()
            assert health_status(port, "inflight.v1.Generation") == SERVING
            assert client.complete(request, timeout=60).finish_reason
            caller.join(120)
            assert retried["result"].finish_reason  # type: ignore[attr-defined]
            retrying.close()
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            process.wait(20)
