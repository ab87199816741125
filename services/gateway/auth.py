"""Bearer-token authentication for the gateway: who is calling, as which tenant, with which rights.

The tokens file has one token a line: `TOKEN TENANT [admin]` (# starts a comment). Calls without
a valid token get UNAUTHENTICATED; Admin calls, and subscriptions to the prefix cache's events (they
carry every tenant's prompt tokens), from a token without `admin` get PERMISSION_DENIED.
Methods whose names start with an exempt prefix (health and reflection by default) need no token.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

ADMIN_ONLY = ("/inflight.v1.Admin/", "/trtllm.TrtllmService/SubscribeKvEvents")
DEFAULT_EXEMPT = ("/grpc.health.v1.Health/", "/grpc.reflection.")


@dataclass(frozen=True)
class Principal:
    tenant: str
    admin: bool


def load_tokens(path: Path) -> dict[str, Principal]:
    tokens = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) not in (2, 3) or (len(fields) == 3 and fields[2] != "admin"):
            raise ValueError(f"{path}:{number}: expected `TOKEN TENANT [admin]`")
        tokens[fields[0]] = Principal(tenant=fields[1], admin=len(fields) == 3)
    return tokens


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value.removeprefix("Bearer ").strip()
    return None


class Authenticator:
    def __init__(self, tokens: dict[str, Principal], exempt: Sequence[str] = DEFAULT_EXEMPT) -> None:
        self.tokens = tokens
        self.exempt = tuple(exempt)

    def principal(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> Principal | None:
        token = bearer_token(metadata)
        return self.tokens.get(token) if token else None

    def check(self, method: str, metadata: Sequence[tuple[str, str | bytes]] | None) -> tuple[grpc.StatusCode, str] | None:
        """None if the call may proceed, else the status to end it with."""
        if method.startswith(self.exempt):
            return None
        principal = self.principal(metadata)
        if principal is None:
            return grpc.StatusCode.UNAUTHENTICATED, "a valid `authorization: Bearer <token>` is required"
        if method.startswith(ADMIN_ONLY) and not principal.admin:
            return grpc.StatusCode.PERMISSION_DENIED, f"{method} needs a token marked admin"
        return None


def _rejecting_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    async def reject(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    async def reject_stream(request: object, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    kwargs = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(reject_stream, **kwargs)
    if handler.stream_stream:
        return grpc.stream_stream_rpc_method_handler(reject_stream, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(reject, **kwargs)
    return grpc.unary_unary_rpc_method_handler(reject, **kwargs)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, authenticator: Authenticator) -> None:
        self.authenticator = authenticator

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        denied = self.authenticator.check(details.method, details.invocation_metadata)
        return handler if denied is None else _rejecting_handler(handler, *denied)
