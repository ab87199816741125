"""Bad requests get INVALID_ARGUMENT naming the field, and leave nothing behind."""

from __future__ import annotations

import grpc
import pytest

from inflight.v1 import generation_pb2
from services.gateway import validation

G = generation_pb2.GenerateRequest


def chat(**fields) -> generation_pb2.GenerateRequest:
    request = G(**fields)
    request.messages.add(role="user", content="hello")
    return request


CASES = [
    ("empty prompt", G(max_tokens=4), "prompt, messages"),
    ("empty messages", G(prompt="", messages=[]), "prompt, messages"),
    ("infinite temperature", chat(temperature=float("inf")), "temperature"),
    ("min_tokens over the default max_tokens", chat(min_tokens=257), "min_tokens"),
    ("min_tokens of 2^31", chat(min_tokens=2**31), "min_tokens"),
    ("too many messages", G(messages=[generation_pb2.ChatMessage(role="user", content="")] * 1025), "messages"),
    ("messages longer than the context", G(messages=[generation_pb2.ChatMessage(role="user", content="word " * 9000)]),
     "messages"),
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


def _limits() -> validation.ValidLimits:
    return validation.ValidLimits(max_model_len=2048, vocab_size=49152)


def test_min_tokens_is_checked_against_the_tokens_the_request_may_generate():
    with pytest.raises(validation.InvalidField, match="^min_tokens"):
        validation.max_new_tokens(chat(min_tokens=2**31), 10, _limits())
    with pytest.raises(validation.InvalidField, match="^min_tokens"):  # no max_tokens: 256 by default
        validation.max_new_tokens(chat(min_tokens=257), 10, _limits())
    with pytest.raises(validation.InvalidField, match="^min_tokens"):  # the default shrinks near the context's end
        validation.max_new_tokens(chat(min_tokens=30), 2030, _limits())
    assert validation.max_new_tokens(chat(min_tokens=256), 10, _limits()) == 256


def test_errors_about_chat_input_name_messages():
    long_chat = chat()
    with pytest.raises(validation.InvalidField, match="^messages: 2048 tokens leave no room"):
        validation.max_new_tokens(long_chat, 2048, _limits())
    with pytest.raises(validation.InvalidField, match="^messages: at most 3 messages"):
        validation.check_request(G(messages=[generation_pb2.ChatMessage(role="user")] * 4), max_messages=3)
    with pytest.raises(validation.InvalidField, match="^prompt: 2048 tokens"):
        validation.max_new_tokens(G(prompt="x"), 2048, _limits())


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), -1e-9])
def test_temperature_must_be_finite_and_not_negative(value):
    with pytest.raises(validation.InvalidField, match="^temperature"):
        validation.check_request(chat(temperature=value))


def test_tiny_temperatures_are_accepted_and_sampled_greedily_by_the_worker():
    for value in (1e-38, 9.99995e-41, 1e-45):
        validation.check_request(chat(temperature=value))


@pytest.mark.slow
def test_prompt_longer_than_the_context_is_rejected(stack):
    with pytest.raises(grpc.RpcError) as raised:
        stack.client.complete(G(prompt="word " * 9000), timeout=60)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details().startswith("prompt:")
    idle = stack.wait_idle()
    assert idle.kv_blocks_free == idle.kv_blocks_total and idle.requests_waiting == 0
