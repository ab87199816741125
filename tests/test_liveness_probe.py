"""The launcher's view of its children's health: when a silent process counts as frozen, and when as still
starting; how many times the scheduler turned SERVING."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.child_health import LivenessProbe, ServingWatch


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


def health_server(address: str, status: int) -> tuple[grpc.Server, health.HealthServicer]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = health.HealthServicer()
    servicer.set("", status)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(address)
    server.start()
    return server, servicer


def wait_for(condition: Callable[[], bool], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


def test_the_serving_watch_counts_every_turn_to_serving_across_scheduler_restarts(tmp_path: Path) -> None:
    address = f"unix://{tmp_path}/scheduler.sock"
    watch = ServingWatch(address)  # before anything listens, as the launcher starts it
    try:
        time.sleep(0.5)
        server, servicer = health_server(address, health_pb2.HealthCheckResponse.NOT_SERVING)
        time.sleep(0.5)
        assert watch.times_ready == 0
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)  # the worker group came up
        assert wait_for(lambda: watch.times_ready == 1)
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)  # lost, and a new group came up
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert wait_for(lambda: watch.times_ready == 2)
        server.stop(0).wait()  # a new scheduler that finds the group up: SERVING from its first answer
        server, _ = health_server(address, health_pb2.HealthCheckResponse.SERVING)
        assert wait_for(lambda: watch.times_ready == 3)
        time.sleep(0.5)
        assert watch.times_ready == 3
    finally:
        watch.close()
        server.stop(0)
