"""Connections that live for days: keepalive agrees on both ends, so an idle stream is never cut.

Real gRPC servers and clients on loopback, with the stack's own option sets and short timers.
The control case shows what the stack did before: a client pinging more often than its server
allows is sent GOAWAY (too_many_pings) and its idle stream dies.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from inflight.connection import KeepalivePolicy, public_server_options
from tests.stack import free_port

METHOD = "/test.Idle/Echo"
# gRPC clients ping at most once a second whatever they ask; a default server strikes out such a
# client within about 6 s of idling (measured on grpcio 1.85), so both cases idle twice that.
POLICY = KeepalivePolicy(interval_s=0.3, timeout_s=2.0)
IDLE_SECONDS = 12.0


def _echo_handler() -> grpc.GenericRpcHandler:
    async def echo(requests, context):  # type: ignore[no-untyped-def]
        async for request in requests:
            yield request

    handler = grpc.stream_stream_rpc_method_handler(echo)
    return grpc.method_handlers_generic_handler("test.Idle", {"Echo": handler})


async def _idle_stream(server_options: list[tuple[str, int]], client_options: list[tuple[str, int]],
                       idle_seconds: float) -> bytes:
    """Open a stream, exchange one message, stay silent for idle_seconds, then exchange another."""
    port = free_port()
    server = grpc.aio.server(options=server_options)
    server.add_generic_rpc_handlers([_echo_handler()])
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=client_options) as channel:
            call = channel.stream_stream(METHOD)()
            await call.write(b"before")
            assert await call.read() == b"before"
            await asyncio.sleep(idle_seconds)
            await call.write(b"after")
            reply = await call.read()
            await call.done_writing()
            return reply
    finally:
        await server.stop(None)


def test_an_idle_stream_outlives_many_pings_when_both_ends_share_the_policy():
    assert asyncio.run(_idle_stream(POLICY.server_options(), POLICY.client_options(), IDLE_SECONDS)) == b"after"


def test_control_a_server_with_grpc_default_ping_policy_cuts_the_same_idle_stream():
    # The stream is gone (GOAWAY too_many_pings): a write finds the RPC finished, as the scheduler did.
    with pytest.raises((grpc.aio.AioRpcError, asyncio.InvalidStateError)) as raised:
        asyncio.run(_idle_stream([], POLICY.client_options(), IDLE_SECONDS))
    error = raised.value
    if isinstance(error, grpc.aio.AioRpcError):
        assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_our_public_client_pings_no_more_often_than_the_gateway_allows():
    from services.client import CHANNEL_OPTIONS

    client_ping = dict(CHANNEL_OPTIONS)["grpc.keepalive_time_ms"]
    allowed = dict(public_server_options())["grpc.http2.min_ping_interval_without_data_ms"]
    assert client_ping >= allowed
    assert dict(public_server_options())["grpc.keepalive_permit_without_calls"] == 1


def test_every_internal_server_accepts_its_clients_pings():
    for policy in (KeepalivePolicy(), KeepalivePolicy(interval_s=1.0)):
        client = dict(policy.client_options())
        server = dict(policy.server_options())
        assert client["grpc.keepalive_time_ms"] >= server["grpc.http2.min_ping_interval_without_data_ms"]
        assert server["grpc.keepalive_permit_without_calls"] == 1 and client["grpc.keepalive_permit_without_calls"] == 1
