"""Typed Python clients for the public API: InflightClient (blocking) and AsyncInflightClient (asyncio).

Both retry a call that fails with UNAVAILABLE before its first response arrived (nothing was
generated for it yet, so a retry cannot duplicate output); after the first token nothing is retried.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field

import grpc

from inflight.v1 import common_pb2, generation_pb2, generation_pb2_grpc

CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]
RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)


@dataclass
class Completion:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    usage: generation_pb2.Usage | None = None
    logprobs: list[common_pb2.TokenLogprob] = field(default_factory=list)
    timings: generation_pb2.Timings | None = None
    request_id: str = ""

    def add(self, response: generation_pb2.GenerateResponse) -> None:
        self.text += response.text
        self.token_ids.extend(response.token_ids)
        self.logprobs.extend(response.logprobs)
        self.request_id = response.request_id
        if response.finish_reason:
            self.finish_reason = common_pb2.FinishReason.Name(response.finish_reason)
            self.usage = response.usage
            self.timings = response.timings


def _metadata(token: str | None, tenant: str | None) -> list[tuple[str, str]]:
    metadata = []
    if token:
        metadata.append(("authorization", f"Bearer {token}"))
    if tenant:
        metadata.append(("x-tenant-id", tenant))
    return metadata


def _credentials(root_certificates: bytes | None, private_key: bytes | None,
                 certificate_chain: bytes | None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)


class InflightClient:
    def __init__(self, target: str = "localhost:50051", *, token: str | None = None, tenant: str | None = None,
                 tls_root_certificates: bytes | None = None, tls_private_key: bytes | None = None,
                 tls_certificate_chain: bytes | None = None, retries: int = 3, channel: grpc.Channel | None = None) -> None:
        if channel is None:
            if tls_root_certificates is not None:
                credentials = _credentials(tls_root_certificates, tls_private_key, tls_certificate_chain)
                channel = grpc.secure_channel(target, credentials, options=CHANNEL_OPTIONS)
            else:
                channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.channel = channel
        self.metadata = _metadata(token, tenant)
        self.retries = retries
        self.generation = generation_pb2_grpc.GenerationStub(self.channel)
        self.admin = generation_pb2_grpc.AdminStub(self.channel)

    def stream(self, request: generation_pb2.GenerateRequest, timeout: float | None = None
               ) -> Iterator[generation_pb2.GenerateResponse]:
        """The streamed responses; cancel() on the returned iterator stops the request."""
        return _RetryingStream(lambda: self.generation.Generate(request, timeout=timeout, metadata=self.metadata),
                               self.retries)

    def complete(self, request: generation_pb2.GenerateRequest, timeout: float | None = None) -> Completion:
        """Run a whole generation through the stream and collect it."""
        result = Completion()
        for response in self.stream(request, timeout):
            result.add(response)
        return result

    def complete_unary(self, request: generation_pb2.GenerateRequest, timeout: float | None = None
                       ) -> generation_pb2.CompleteResponse:
        return _retry(lambda: self.generation.Complete(request, timeout=timeout, metadata=self.metadata), self.retries)

    def abort(self, request_id: str) -> bool:
        return self.generation.Abort(generation_pb2.AbortRequest(request_id=request_id), timeout=10,
                                     metadata=self.metadata).found

    def model_info(self) -> generation_pb2.ModelInfoResponse:
        return self.generation.ModelInfo(generation_pb2.ModelInfoRequest(), timeout=10, metadata=self.metadata)

    def tokenize(self, prompt: str = "", messages: Sequence[generation_pb2.ChatMessage] = ()) -> generation_pb2.TokenizeResponse:
        return self.generation.Tokenize(generation_pb2.TokenizeRequest(prompt=prompt, messages=messages), timeout=10,
                                        metadata=self.metadata)

    def detokenize(self, token_ids: Sequence[int]) -> str:
        return self.generation.Detokenize(generation_pb2.DetokenizeRequest(token_ids=token_ids), timeout=10,
                                          metadata=self.metadata).text

    def stats(self) -> common_pb2.Stats:
        return self.admin.GetStats(common_pb2.GetStatsRequest(), timeout=10, metadata=self.metadata)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> InflightClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _retry(call, retries: int):  # type: ignore[no-untyped-def]
    for attempt in range(retries + 1):
        try:
            return call()
        except grpc.RpcError as error:
            if error.code() not in RETRYABLE or attempt == retries:  # type: ignore[attr-defined]
                raise
            time.sleep(0.2 * 2**attempt)


class _RetryingStream:
    """A response stream that restarts the call on UNAVAILABLE until the first response arrives."""

    def __init__(self, start, retries: int) -> None:  # type: ignore[no-untyped-def]
        self._start, self._retries = start, retries
        self._call = start()
        self._received = False

    def __iter__(self) -> _RetryingStream:
        return self

    def __next__(self) -> generation_pb2.GenerateResponse:
        attempt = 0
        while True:
            try:
                response = next(self._call)
                self._received = True
                return response
            except grpc.RpcError as error:
                if self._received or error.code() not in RETRYABLE or attempt >= self._retries:  # type: ignore[attr-defined]
                    raise
                time.sleep(0.2 * 2**attempt)
                attempt += 1
                self._call = self._start()

    def cancel(self) -> None:
        self._call.cancel()


class AsyncInflightClient:
    """The asyncio client; use inside a running event loop."""

    def __init__(self, target: str = "localhost:50051", *, token: str | None = None, tenant: str | None = None,
                 tls_root_certificates: bytes | None = None, retries: int = 3) -> None:
        if tls_root_certificates is not None:
            credentials = grpc.ssl_channel_credentials(tls_root_certificates)
            self.channel = grpc.aio.secure_channel(target, credentials, options=CHANNEL_OPTIONS)
        else:
            self.channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.metadata = _metadata(token, tenant)
        self.retries = retries
        self.generation = generation_pb2_grpc.GenerationStub(self.channel)
        self.admin = generation_pb2_grpc.AdminStub(self.channel)

    async def stream(self, request: generation_pb2.GenerateRequest, timeout: float | None = None
                     ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        received = False
        for attempt in range(self.retries + 1):
            call = self.generation.Generate(request, timeout=timeout, metadata=self.metadata)
            try:
                async for response in call:
                    received = True
                    yield response
                return
            except grpc.aio.AioRpcError as error:
                if received or error.code() not in RETRYABLE or attempt == self.retries:
                    raise
                await asyncio.sleep(0.2 * 2**attempt)
            finally:
                call.cancel()

    async def complete(self, request: generation_pb2.GenerateRequest, timeout: float | None = None) -> Completion:
        result = Completion()
        async for response in self.stream(request, timeout):
            result.add(response)
        return result

    async def abort(self, request_id: str) -> bool:
        reply = await self.generation.Abort(generation_pb2.AbortRequest(request_id=request_id), timeout=10,
                                            metadata=self.metadata)
        return reply.found

    async def model_info(self) -> generation_pb2.ModelInfoResponse:
        return await self.generation.ModelInfo(generation_pb2.ModelInfoRequest(), timeout=10, metadata=self.metadata)

    async def stats(self) -> common_pb2.Stats:
        return await self.admin.GetStats(common_pb2.GetStatsRequest(), timeout=10, metadata=self.metadata)

    async def close(self) -> None:
        await self.channel.close()
