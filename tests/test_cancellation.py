"""A request that ends early — client cancel, deadline, stop string — gives back every KV block."""

from __future__ import annotations

import grpc
import pytest

from inflight.v1 import generation_pb2


def long_request(text: str = "Tell me a very long story about dragons.") -> generation_pb2.GenerateRequest:
    request = generation_pb2.GenerateRequest(max_tokens=2000, ignore_eos=True)
    request.messages.add(role="user", content=text)
    return request


@pytest.mark.slow
def test_client_cancel_mid_stream_frees_all_blocks(stack):
    stream = stack.client.stream(long_request(), timeout=120)
    for _ in range(5):
        next(stream)
    busy = stack.stats()
    assert busy.requests_running == 1
    assert busy.kv_blocks_free < busy.kv_blocks_total
    stream.cancel()
    idle = stack.wait_idle()
    assert idle.requests_running == 0 and idle.requests_waiting == 0
    assert idle.kv_blocks_free == idle.kv_blocks_total


@pytest.mark.slow
def test_deadline_expiry_ends_with_deadline_exceeded_and_frees_blocks(stack):
    with pytest.raises(grpc.RpcError) as raised:
        for _ in stack.client.stream(long_request("Count from one to one thousand."), timeout=1.5):
            pass
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    idle = stack.wait_idle()
    assert idle.requests_running == 0
    assert idle.kv_blocks_free == idle.kv_blocks_total


@pytest.mark.slow
def test_stop_string_cuts_the_text_and_frees_blocks(stack):
    plain = generation_pb2.GenerateRequest(max_tokens=24, ignore_eos=True)
    plain.messages.add(role="user", content="What is the capital of France?")
    full = stack.client.complete(plain, timeout=60).text
    assert "Paris" in full
    cut = generation_pb2.GenerateRequest()
    cut.CopyFrom(plain)
    cut.stop.append("Paris")
    result = stack.client.complete(cut, timeout=60)
    assert result.finish_reason == "FINISH_REASON_STOP"
    assert result.text == full[: full.index("Paris")]
    assert "Paris" not in result.text
    idle = stack.wait_idle()
    assert idle.kv_blocks_free == idle.kv_blocks_total
