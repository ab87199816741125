"""How the launcher learns about its children through their gRPC health services: whether a process is
frozen, and how many times the scheduler has turned SERVING."""

from __future__ import annotations

import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

# A process still loading refuses connections; gRPC's default backoff after that (1 s, then growing) would
# delay the first answer.
FAST_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 250), ("grpc.min_reconnect_backoff_ms", 250),
                  ("grpc.max_reconnect_backoff_ms", 1000)]


class LivenessProbe:
    """A process's health service, asked over its socket. Any answer, SERVING or not, proves it alive; a
    process that answered once and then stays silent past the timeout is frozen (SIGSTOP, a hung GPU, a
    deadlock) and must be replaced: it will not exit by itself."""

    def __init__(self, address: str, liveness_timeout: float) -> None:
        self.address, self.liveness_timeout = address, liveness_timeout
        self._channel: grpc.Channel | None = None
        self._last_ok: float | None = None  # None until the process first answered
        self._next_check = 0.0

    def reset(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self._channel, self._last_ok = None, None

    @property
    def has_answered(self) -> bool:
        return self._last_ok is not None

    def answered(self) -> None:
        """The process is known to have answered by other means (the stack just turned ready)."""
        self._last_ok = time.monotonic()

    def frozen(self) -> bool:
        """Asks at most once a second; True once an answering process has been silent past the timeout."""
        now = time.monotonic()
        if self.liveness_timeout <= 0 or now < self._next_check:
            return False
        self._next_check = now + 1.0
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.address, options=FAST_RECONNECT)
        try:
            health_pb2_grpc.HealthStub(self._channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
            self._last_ok = time.monotonic()
        except grpc.RpcError:
            pass
        return self._last_ok is not None and time.monotonic() - self._last_ok > self.liveness_timeout


class ServingWatch:
    """How many times the scheduler's health has turned SERVING: a worker group came up (or a new scheduler
    reached the running one).

    A health Watch stream on its own thread hears of each change the moment it happens, before any client
    can have been served. Polling from the supervising loop, behind the liveness probes' own calls, could
    miss a short ready spell: a group killed right after turning ready would be taken for one that never
    came up (and the whole stack would exit instead of replacing it).
    """

    def __init__(self, address: str) -> None:
        self._times_ready = 0
        self._closed = False
        self._channel = grpc.insecure_channel(address, options=FAST_RECONNECT)
        self._call: grpc.Future | None = None
        self._thread = threading.Thread(target=self._watch, name="serving-watch", daemon=True)
        self._thread.start()

    @property
    def times_ready(self) -> int:
        return self._times_ready

    def _watch(self) -> None:
        stub = health_pb2_grpc.HealthStub(self._channel)
        while not self._closed:
            # Each stream may reach a new scheduler, whose first answer is its status now: SERVING there
            # counts (counting the same spell twice only says a group was up, which it was).
            serving = False
            try:
                self._call = stub.Watch(health_pb2.HealthCheckRequest(), wait_for_ready=True)
                for reply in self._call:
                    now_serving = reply.status == health_pb2.HealthCheckResponse.SERVING
                    if now_serving and not serving:
                        self._times_ready += 1
                    serving = now_serving
            except (grpc.RpcError, ValueError):  # the scheduler restarting; ValueError: the channel closed
                time.sleep(0.2)

    def close(self) -> None:
        self._closed = True
        if self._call is not None:
            self._call.cancel()
        self._channel.close()
        self._thread.join(timeout=2.0)
