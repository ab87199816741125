"""How every gRPC connection of the stack is kept alive and re-established: one policy, both ends.

A gRPC server counts a client's ping as a strike when it comes sooner after the previous one than
the server's `min_ping_interval_without_data` (5 minutes by default); after two strikes it sends
GOAWAY `too_many_pings` and the client's calls die. So each server here allows pings at half the
interval its clients use, and clients keep pinging idle connections, so a dead peer is noticed on
an idle stream too. Reconnection backoff is short: internal peers are local and come back in
seconds after a restart.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc

# Public clients: ours ping every 30 s; grpc-go and grpc-java refuse to ping more often than 10 s.
PUBLIC_MIN_CLIENT_PING_S = 10.0
PUBLIC_SERVER_PING_S = 30.0

Options = list[tuple[str, int]]

# What a write or read on an asyncio stream raises once the stream is gone. InvalidStateError: the call had
# already ended (e.g. the server sent GOAWAY).
STREAM_GONE = (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError)


@dataclass(frozen=True)
class KeepalivePolicy:
    interval_s: float = 20.0  # a client pings after this long without a frame from its server
    timeout_s: float = 10.0   # and drops the connection if the ping is not answered in this time

    def client_options(self) -> Options:
        return [
            ("grpc.keepalive_time_ms", _ms(self.interval_s)),
            ("grpc.keepalive_timeout_ms", _ms(self.timeout_s)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),  # keep pinging an idle stream
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2_000),
        ]

    def server_options(self, min_client_ping_s: float | None = None) -> Options:
        """Accept this policy's client pings (or pings min_client_ping_s apart), and ping idle clients too."""
        allowed = self.interval_s / 2 if min_client_ping_s is None else min_client_ping_s
        return [
            ("grpc.keepalive_time_ms", _ms(self.interval_s)),
            ("grpc.keepalive_timeout_ms", _ms(self.timeout_s)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", _ms(allowed)),
            ("grpc.http2.max_ping_strikes", 2),
        ]


def public_server_options() -> Options:
    """The gateway's public port: clients we do not control, pinging no more often than every 10 s."""
    policy = KeepalivePolicy(interval_s=PUBLIC_SERVER_PING_S, timeout_s=10.0)
    return policy.server_options(min_client_ping_s=PUBLIC_MIN_CLIENT_PING_S * 0.9)


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))
