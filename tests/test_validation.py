"""Bad requests get INVALID_ARGUMENT naming the field, and leave nothing behind."""

from __future__ import annotations

import grpc
import pytest

from inflight.v1 import generation_pb2

G = generation_pb2.GenerateRequest


def chat(**fields) -> generation_pb2.GenerateRequest:
    request = G(**fields)
    request.messages.add(role="user", content="hello")
    return request


CASES = [
    ("empty prompt", G(max_tokens=4), "prompt"),
    ("prompt and messages", chat(prompt="hi"), "prompt"),
    ("unknown role", G(messages=[generation_pb2.ChatMessage(role="wizard", content="x")]), "messages[0].role"),
    ("negative temperature", chat(temperature=-0.5), "temperature"),
    ("NaN temperature", chat(temperature=float("nan")), "temperature"),
    ("top_p zero", chat(top_p=0.0), "top_p"),
    ("top_p above one", chat(top_p=1.01), "top_p"),
    ("too many stop strings", chat(stop=[f"s{i}" for i in range(17)]), "stop"),
    ("empty stop string", chat(stop=["ok", ""]), "stop[1]"),
    ("max_tokens over context", chat(max_tokens=9000), "max_tokens"),
    ("oversize input", G(prompt="x" * 1_000_001), "prompt"),
    ("stop token outside vocabulary", chat(stop_token_ids=[10**6]), "stop_token_ids[0]"),
    ("min_p above one", chat(min_p=1.5), "min_p"),
    ("repetition penalty zero", chat(repetition_penalty=0.0), "repetition_penalty"),
    ("presence penalty too large", chat(presence_penalty=3.0), "presence_penalty"),
    ("frequency penalty NaN", chat(frequency_penalty=float("nan")), "frequency_penalty"),
    ("too many top logprobs", chat(top_logprobs=21), "top_logprobs"),
    ("min_tokens over max_tokens", chat(max_tokens=4, min_tokens=5), "min_tokens"),
    ("request id too long", chat(request_id="x" * 129), "request_id"),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,request_message,field", CASES, ids=[c[0] for c in CASES])
def test_invalid_request_names_the_field(stack, name, request_message, field):
    with pytest.raises(grpc.RpcError) as raised:
        stack.client.complete(request_message, timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details().startswith(f"{field}:"), raised.value.details()


@pytest.mark.slow
def test_prompt_longer_than_the_context_is_rejected(stack):
    with pytest.raises(grpc.RpcError) as raised:
        stack.client.complete(G(prompt="word " * 9000), timeout=60)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details().startswith("prompt:")
    idle = stack.wait_idle()
    assert idle.kv_blocks_free == idle.kv_blocks_total and idle.requests_waiting == 0
