"""Bytes protobuf cannot parse get INVALID_ARGUMENT naming the field, not `UNKNOWN: Unexpected DecodeError`."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import grpc
import pytest
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from inflight.v1 import generation_pb2, generation_pb2_grpc
from services.gateway.malformed import MalformedRequestInterceptor

GENERATE = "/inflight.v1.Generation/Generate"
TOKENIZE = "/inflight.v1.Generation/Tokenize"
BAD = b"\xff\xfe"


class EchoGeneration(generation_pb2_grpc.GenerationServicer):
    async def Generate(self, request, context):  # type: ignore[no-untyped-def]
        yield generation_pb2.GenerateResponse(text=request.prompt, request_id=request.request_id)

    async def Tokenize(self, request, context):  # type: ignore[no-untyped-def]
        return generation_pb2.TokenizeResponse(tokens=[request.prompt])


def serve(body: Callable[[grpc.aio.Channel], Awaitable[None]]) -> None:
    """Runs `body` against a real aio server on a free local port, with the interceptor."""

    async def scenario() -> None:
        server = grpc.aio.server(interceptors=[MalformedRequestInterceptor()])
        generation_pb2_grpc.add_GenerationServicer_to_server(EchoGeneration(), server)
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        reflection.enable_server_reflection([health.SERVICE_NAME, reflection.SERVICE_NAME], server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await asyncio.wait_for(body(channel), timeout=5)
        finally:
            await server.stop(grace=None)

    asyncio.run(scenario())


def corrupt(message: generation_pb2.GenerateRequest | generation_pb2.TokenizeRequest, placeholder: str) -> bytes:
    """`message` serialized, with the bytes of the one string equal to `placeholder` made invalid UTF-8."""
    data, raw = message.SerializeToString(), placeholder.encode()
    assert data.count(raw) == 1 and len(raw) % len(BAD) == 0
    bad = data.replace(raw, BAD * (len(raw) // len(BAD)))
    with pytest.raises(DecodeError):
        type(message).FromString(bad)
    return bad


async def generate(channel: grpc.aio.Channel, data: bytes) -> list[generation_pb2.GenerateResponse]:
    method = channel.unary_stream(GENERATE, request_serializer=None,
                                  response_deserializer=generation_pb2.GenerateResponse.FromString)
    return [response async for response in method(data)]


async def tokenize(channel: grpc.aio.Channel, data: bytes) -> generation_pb2.TokenizeResponse:
    method = channel.unary_unary(TOKENIZE, request_serializer=None,
                                 response_deserializer=generation_pb2.TokenizeResponse.FromString)
    return await method(data)


async def rejected(call: Awaitable[object]) -> str:
    """The details of the INVALID_ARGUMENT that `call` must end with."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value
    return raised.value.details() or ""


CHAT = [generation_pb2.ChatMessage(role="system", content="be brief"),
        generation_pb2.ChatMessage(role="user", content="XXXX")]


@pytest.mark.parametrize(("request_", "placeholder", "path"), [
    (generation_pb2.GenerateRequest(prompt="XXXX"), "XXXX", "prompt"),
    (generation_pb2.GenerateRequest(messages=CHAT), "XXXX", "messages[1].content"),
    (generation_pb2.GenerateRequest(messages=[generation_pb2.ChatMessage(role="RRRR", content="hi")]),
     "RRRR", "messages[0].role"),
    (generation_pb2.GenerateRequest(prompt="hi", request_id="IIII", max_tokens=4), "IIII", "request_id"),
    (generation_pb2.GenerateRequest(prompt="hi", stop=["a", "b", "SSSS"], seed=3), "SSSS", "stop[2]"),
])
def test_invalid_utf8_in_generate_names_the_field(request_: generation_pb2.GenerateRequest, placeholder: str,
                                                  path: str) -> None:
    async def body(channel: grpc.aio.Channel) -> None:
        details = await rejected(generate(channel, corrupt(request_, placeholder)))
        assert details.startswith(f"{path}: not valid UTF-8"), details

    serve(body)


def test_invalid_utf8_in_tokenize_names_the_field() -> None:
    async def body(channel: grpc.aio.Channel) -> None:
        details = await rejected(tokenize(channel, corrupt(generation_pb2.TokenizeRequest(prompt="PPPP"), "PPPP")))
        assert details.startswith("prompt: not valid UTF-8"), details

    serve(body)


def test_truncated_and_garbage_bytes_are_malformed() -> None:
    whole = generation_pb2.GenerateRequest(prompt="hello world", max_tokens=8).SerializeToString()
    truncated = whole[:6]  # the prompt's length says 11 bytes, 4 follow
    garbage = b"\xff" * 12  # a tag varint that never ends

    async def body(channel: grpc.aio.Channel) -> None:
        for data in (truncated, garbage):
            assert "malformed" in await rejected(generate(channel, data))
            assert "malformed" in await rejected(tokenize(channel, data))

    serve(body)


def test_health_check_with_garbage_is_invalid_argument() -> None:
    async def body(channel: grpc.aio.Channel) -> None:
        check = channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=None,
                                    response_deserializer=health_pb2.HealthCheckResponse.FromString)
        assert "malformed" in await rejected(check(b"\x0a\x05ab"))
        assert (await check(b"")).status == health_pb2.HealthCheckResponse.SERVING

    serve(body)


def test_streamed_requests_are_checked_one_by_one() -> None:
    """Server reflection is stream-stream: a good request is answered, the bad one after it ends the call."""
    good = reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString()

    async def body(channel: grpc.aio.Channel) -> None:
        method = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                                       request_serializer=None,
                                       response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        call = method(iter([good, b"\xff" * 12]))
        first = await call.read()
        assert health.SERVICE_NAME in [service.name for service in first.list_services_response.service]
        assert "malformed" in await rejected(call.read())

    serve(body)


def test_well_formed_requests_pass_through() -> None:
    async def body(channel: grpc.aio.Channel) -> None:
        request = generation_pb2.GenerateRequest(prompt="héllo ✓", request_id="r-1", stop=["x"])
        responses = await generate(channel, request.SerializeToString())
        assert [(r.text, r.request_id) for r in responses] == [("héllo ✓", "r-1")]
        tokenized = await tokenize(channel, generation_pb2.TokenizeRequest(prompt="héllo").SerializeToString())
        assert list(tokenized.tokens) == ["héllo"]

    serve(body)
