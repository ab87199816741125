"""INVALID_ARGUMENT, not UNKNOWN, for requests that protobuf cannot parse.

grpc's aio server lets a request deserializer's DecodeError escape as `UNKNOWN: Unexpected
DecodeError`, which blames the server for the client's bytes: a string field holding invalid UTF-8,
or a truncated or corrupt message. MalformedRequestInterceptor gives every handler a deserializer
that never raises (it returns a _Malformed marker instead) and a behaviour that ends the call with
INVALID_ARGUMENT when it meets that marker, naming the field when it can (`messages[1].content: not
valid UTF-8`). Well-formed requests are parsed once, by the original deserializer, as before.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NamedTuple

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, FileDescriptor
from google.protobuf.message import DecodeError, Message

from services.gateway.handlers import replace_behavior

MALFORMED = "request: malformed message (truncated or corrupt protobuf)"


class _Malformed(NamedTuple):
    """What the tolerant deserializer returns, in place of a request, for bytes that do not parse."""

    text: str


def _as_bytes(messages: Any) -> None:
    """Retypes every string field as bytes, and map entries as plain messages (a map key cannot be bytes)."""
    for message in messages:
        message.options.ClearField("map_entry")
        for field in message.field:
            if field.type == FieldDescriptor.TYPE_STRING:
                field.type = FieldDescriptor.TYPE_BYTES
        _as_bytes(message.nested_type)


@functools.cache
def _twin(message_class: type[Message]) -> type[Message]:
    """The same message in a private pool, its strings (and all its files' strings) retyped as bytes."""
    pool, added = descriptor_pool.DescriptorPool(), set()

    def add(file: FileDescriptor) -> None:  # dependencies first
        if file.name not in added:
            added.add(file.name)
            for dependency in file.dependencies:
                add(dependency)
            proto = descriptor_pb2.FileDescriptorProto()
            file.CopyToProto(proto)
            _as_bytes(proto.message_type)
            pool.Add(proto)

    add(message_class.DESCRIPTOR.file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(message_class.DESCRIPTOR.full_name))


def _invalid_utf8(twin: Message, original: Descriptor, prefix: str = "") -> str | None:
    """The first field path (in field-number order) whose string bytes are not UTF-8."""
    for field, value in twin.ListFields():
        source = original.fields_by_name.get(field.name)
        if source is None:
            continue
        name = prefix + field.name
        items = [(f"{name}[{i}]", item) for i, item in enumerate(value)] if field.is_repeated else [(name, value)]
        for path, item in items:
            if source.message_type is not None:
                found = _invalid_utf8(item, source.message_type, path + ".")
                if found:
                    return found
            elif source.type == FieldDescriptor.TYPE_STRING:
                try:
                    item.decode("utf-8")
                except UnicodeDecodeError:
                    return path
    return None


def describe_malformed(message_class: type[Message], data: bytes) -> str:
    """Why `data` is not a valid `message_class`: the field holding invalid UTF-8, else MALFORMED."""
    try:
        path = _invalid_utf8(_twin(message_class).FromString(data), message_class.DESCRIPTOR)
    except Exception:  # noqa: BLE001 - the twin fails too (truncated or corrupt), or cannot be built
        path = None
    return f"{path}: not valid UTF-8" if path else MALFORMED


def _tolerant(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    message_class = getattr(deserialize, "__self__", None)  # set when it is SomeMessage.FromString
    known = isinstance(message_class, type) and issubclass(message_class, Message)

    def tolerant(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError:
            return _Malformed(describe_malformed(message_class, data) if known else MALFORMED)

    return tolerant


async def _admit(request: Any, context: grpc.aio.ServicerContext) -> Any:
    if isinstance(request, _Malformed):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.text)
    return request


async def _checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
    async for request in requests:
        yield await _admit(request, context)


def _guarded(behavior: Callable[..., Any], streaming_request: bool) -> Callable[..., Any] | None:
    """`behavior` ending the call on a _Malformed request; None for a sync behaviour (left alone)."""

    async def admitted(request: Any, context: grpc.aio.ServicerContext) -> Any:
        return _checked(request, context) if streaming_request else await _admit(request, context)

    if inspect.isasyncgenfunction(behavior):
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with contextlib.aclosing(behavior(await admitted(request, context), context)) as responses:
                async for response in responses:
                    yield response
        return stream
    if inspect.iscoroutinefunction(behavior):
        async def single(request: Any, context: grpc.aio.ServicerContext) -> Any:
            return await behavior(await admitted(request, context), context)
        return single
    return None


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every handler so that request bytes protobuf rejects end the call with INVALID_ARGUMENT."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler  # nothing to deserialize
        return replace_behavior(handler, lambda behavior: _guarded(behavior, handler.request_streaming),
                                request_deserializer=_tolerant(handler.request_deserializer))
