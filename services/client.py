"""A typed Python client for the public API."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc

from inflight.v1 import common_pb2, generation_pb2, generation_pb2_grpc

CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
]


@dataclass
class Completion:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    usage: generation_pb2.Usage | None = None


class InflightClient:
    def __init__(self, target: str = "localhost:50051", channel: grpc.Channel | None = None) -> None:
        self.channel = channel or grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.generation = generation_pb2_grpc.GenerationStub(self.channel)
        self.admin = generation_pb2_grpc.AdminStub(self.channel)

    def stream(self, request: generation_pb2.GenerateRequest, timeout: float | None = None
               ) -> Iterator[generation_pb2.GenerateResponse]:
        return self.generation.Generate(request, timeout=timeout)

    def complete(self, request: generation_pb2.GenerateRequest, timeout: float | None = None) -> Completion:
        """Run a whole generation and collect it."""
        result = Completion()
        for response in self.stream(request, timeout):
            result.text += response.text
            result.token_ids.extend(response.token_ids)
            if response.finish_reason:
                result.finish_reason = common_pb2.FinishReason.Name(response.finish_reason)
                result.usage = response.usage
        return result

    def stats(self) -> common_pb2.Stats:
        return self.admin.GetStats(common_pb2.GetStatsRequest(), timeout=10)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "InflightClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
