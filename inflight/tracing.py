"""OpenTelemetry tracing for one process: off unless given an OTLP endpoint.

`start_tracing` builds a tracer provider that batches spans to an OTLP/gRPC collector, makes W3C
`traceparent` the propagation format, and hands back gRPC aio interceptors: one for the process's
server (continuing a caller's trace), some for its channels (carrying the trace onward). Without an
endpoint it returns TRACING_OFF, which holds no interceptors and imports nothing: opentelemetry is an
optional extra (`pip install inflight[otel]`), loaded only when tracing is on.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import os
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

TRACES_ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"  # the standard spelling, the flag's default
INSTRUMENTATION_NAME = "inflight"
# Called every second or continuously by probes and pollers: a span each would drown the requests.
HEALTH_AND_REFLECTION = ("/grpc.health.v1.Health/", "/grpc.reflection.")


@dataclass(frozen=True)
class Tracing:
    """What a process needs to trace: interceptors for its server and channels, and a tracer of its own."""

    server_interceptors: list[grpc.aio.ServerInterceptor] = field(default_factory=list)
    client_interceptors: list[grpc.aio.ClientInterceptor] = field(default_factory=list)
    tracer: Tracer | None = None
    shutdown: Callable[[], None] = lambda: None  # export what is still batched, then stop

    @property
    def enabled(self) -> bool:
        return self.tracer is not None


TRACING_OFF = Tracing()


def add_otlp_traces_endpoint(parser: argparse.ArgumentParser) -> None:
    """The flag, spelled as vLLM and SMG spell it, for every process that traces."""
    parser.add_argument("--otlp-traces-endpoint", default=os.environ.get(TRACES_ENDPOINT_ENV, ""),
                        help="send OpenTelemetry traces to this OTLP/gRPC collector, e.g. http://localhost:4317 "
                             f"(default: ${TRACES_ENDPOINT_ENV}; empty: no tracing)")


def start_tracing(service_name: str, endpoint: str, untraced: Sequence[str] = HEALTH_AND_REFLECTION) -> Tracing:
    """Tracing to the OTLP/gRPC collector at endpoint (`http://host:4317` plain, `https://` over TLS, a bare
    `host:4317` plain), spans named as service_name's; calls whose full method name starts with one of
    `untraced` get no span. TRACING_OFF for no endpoint."""
    if not endpoint:
        return TRACING_OFF
    try:
        from opentelemetry import propagate
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError as missing:
        raise SystemExit(f"--otlp-traces-endpoint needs OpenTelemetry ({missing.name} is not installed): "
                         "pip install 'inflight[otel]'") from None
    propagate.set_global_textmap(TraceContextTextMapPropagator())
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
    # The exporter would take a bare host:port for a TLS endpoint; collectors on 4317 mostly speak plain gRPC.
    plain_unless_told = endpoint if "://" in endpoint else f"http://{endpoint}"
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=plain_unless_told)))
    traced = _traced_filter(tuple(untraced))
    clients = aio_client_interceptors(tracer_provider=provider, filter_=traced)
    return Tracing(
        server_interceptors=[aio_server_interceptor(tracer_provider=provider, filter_=traced)],
        client_interceptors=[_EndedWithTheCall(c) if isinstance(c, grpc.aio.UnaryStreamClientInterceptor) else c
                             for c in clients],
        tracer=provider.get_tracer(INSTRUMENTATION_NAME),
        shutdown=provider.shutdown,
    )


def _traced_filter(untraced: tuple[str, ...]) -> Callable[[Any], bool]:
    """True for a call (server or client call details) whose method is not under an untraced prefix."""

    def traced(details: Any) -> bool:
        method = details.method
        if isinstance(method, bytes):  # some grpc versions give client call details' method as bytes
            method = method.decode()
        return not method.startswith(untraced)

    return traced


class _EndedWithTheCall(grpc.aio.UnaryStreamClientInterceptor):
    """OpenTelemetry's span for a server-streaming call ends when the caller reads the stream to its end. The
    gateway stops reading at the scheduler's finish event or at a stop string, which would leave the span open
    until garbage collection (late, or never exported); this ends it when the call itself ends."""

    def __init__(self, traced: grpc.aio.UnaryStreamClientInterceptor) -> None:
        self._traced = traced

    async def intercept_unary_stream(self, continuation: Callable[..., Awaitable[Any]],
                                     client_call_details: grpc.aio.ClientCallDetails, request: Any) -> Any:
        calls: list[grpc.aio.Call] = []

        async def started(details: grpc.aio.ClientCallDetails, request: Any) -> Any:
            call = await continuation(details, request)
            calls.append(call)
            return call

        responses = await self._traced.intercept_unary_stream(started, client_call_details, request)
        if calls and inspect.isasyncgen(responses):
            calls[0].add_done_callback(lambda _: _close_soon(responses))
        return responses


_closing: set[asyncio.Task[None]] = set()  # held until done: the event loop keeps only weak references


def _close_soon(responses: AsyncGenerator[Any, None]) -> None:
    task = asyncio.get_running_loop().create_task(_close(responses))
    _closing.add(task)
    task.add_done_callback(_closing.discard)


async def _close(responses: AsyncGenerator[Any, None]) -> None:
    try:
        await responses.aclose()  # its `finally` ends the span
    except RuntimeError:  # still being read: the reader takes it to its end, and the span with it
        pass
