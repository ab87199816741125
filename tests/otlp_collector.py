"""An OTLP/gRPC trace collector in the test process: it keeps every span exported to it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2


@dataclass(frozen=True)
class ExportedSpan:
    service: str  # the exporting process's resource `service.name`
    span: trace_pb2.Span


def _service_name(resource_spans: trace_pb2.ResourceSpans) -> str:
    for attribute in resource_spans.resource.attributes:
        if attribute.key == "service.name":
            return attribute.value.string_value
    return ""


class OtlpCollector(trace_service_pb2_grpc.TraceServiceServicer):
    """Listens on a free loopback port; `endpoint` is what --otlp-traces-endpoint takes."""

    def __init__(self) -> None:
        self._spans: list[ExportedSpan] = []
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,
               context: grpc.ServicerContext) -> trace_service_pb2.ExportTraceServiceResponse:
        received = [ExportedSpan(_service_name(resource), span)
                    for resource in request.resource_spans for scope in resource.scope_spans for span in scope.spans]
        with self._lock:
            self._spans += received
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[ExportedSpan]:
        with self._lock:
            return list(self._spans)

    def wait_for(self, found: Callable[[list[ExportedSpan]], bool], timeout: float = 20.0) -> list[ExportedSpan]:
        """The spans so far once `found` holds for them; AssertionError with what arrived at timeout."""
        deadline = time.monotonic() + timeout
        while not found(spans := self.spans()):
            if time.monotonic() > deadline:
                names = sorted({f"{s.service}: {s.span.name}" for s in spans})
                raise AssertionError(f"the expected spans did not arrive in {timeout}s; got {names}")
            time.sleep(0.1)
        return spans

    def stop(self) -> None:
        self._server.stop(grace=None)
