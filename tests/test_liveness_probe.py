"""The launcher's liveness probe: when a silent process counts as frozen, and when as still starting."""

from __future__ import annotations

import time
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from services.child_health import LivenessProbe


def wait_frozen(probe: LivenessProbe, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if probe.frozen():  # asks at most once a second
            return True
        time.sleep(0.05)
    return False


def test_a_process_that_never_answered_is_still_starting(tmp_path: Path) -> None:
    probe = LivenessProbe(f"unix://{tmp_path}/nobody.sock", liveness_timeout=1.0)
    assert not wait_frozen(probe, 3.0) and not probe.has_answered  # a big model may load for minutes
    probe.reset()


def test_silence_after_the_stack_turned_ready_is_a_freeze(tmp_path: Path) -> None:
    # The stack turning ready proves the process answered, even if the probe itself never got through
    # (a process frozen right after readiness must still be replaced).
    probe = LivenessProbe(f"unix://{tmp_path}/frozen.sock", liveness_timeout=1.0)
    probe.answered()
    assert wait_frozen(probe, 5.0)
    probe.reset()


def test_an_answering_process_is_alive_and_found_frozen_once_silent(tmp_path: Path) -> None:
    address = f"unix://{tmp_path}/health.sock"
    probe = LivenessProbe(address, liveness_timeout=1.0)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    server.add_insecure_port(address)
    server.start()
    try:
        assert not wait_frozen(probe, 2.5) and probe.has_answered
        server.stop(0).wait()
        assert wait_frozen(probe, 5.0)
    finally:
        server.stop(0)
        probe.reset()
