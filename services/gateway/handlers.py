"""What the gateway's interceptors share: a handler's behaviour, and the handler with it replaced."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

Behavior = Callable[..., Any]


def behavior_name(handler: grpc.RpcMethodHandler) -> str:
    """unary_unary, unary_stream, stream_unary or stream_stream: the field that holds the behaviour."""
    return ("stream_" if handler.request_streaming else "unary_") + ("stream" if handler.response_streaming else "unary")


def replace_behavior(handler: grpc.RpcMethodHandler, wrap: Callable[[Behavior], Behavior | None],
                     **fields: Any) -> grpc.RpcMethodHandler:
    """handler with its behaviour wrapped (and other fields replaced); unchanged where wrap gives None
    or the handler is not grpc's own handler tuple."""
    if not hasattr(handler, "_replace"):
        return handler
    name = behavior_name(handler)
    wrapped = wrap(getattr(handler, name))
    return handler if wrapped is None else handler._replace(**{name: wrapped}, **fields)
