"""The public API: sampling parameters, logprobs, Complete, Abort, ModelInfo, Tokenize, Detokenize."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import torch

from inflight.v1 import common_pb2, generation_pb2
from tests.test_equivalence import reference_tokens
from tests.test_grpcurl import grpcurl, parse_stream

G = generation_pb2.GenerateRequest
QUESTION = "Write a short story about a lighthouse keeper."


def chat(text: str = QUESTION, **fields) -> generation_pb2.GenerateRequest:
    request = G(**fields)
    request.messages.add(role="user", content=text)
    return request


@pytest.mark.slow
def test_same_seed_gives_the_same_tokens_and_other_seeds_differ(stack):
    sampled = dict(max_tokens=24, temperature=1.0, ignore_eos=True)
    first = stack.client.complete(chat(seed=42, **sampled), timeout=60).token_ids
    again = stack.client.complete(chat(seed=42, **sampled), timeout=60).token_ids
    others = [stack.client.complete(chat(seed=s, **sampled), timeout=60).token_ids for s in (1, 2, 3)]
    assert first == again
    assert any(other != first for other in others)


@pytest.mark.slow
def test_temperature_zero_and_top_k_one_are_greedy(stack, hf_reference):
    _, expected = reference_tokens(hf_reference, "chat", QUESTION)
    greedy = stack.client.complete(chat(max_tokens=40, ignore_eos=True, temperature=0.0), timeout=60).token_ids
    top_k_one = stack.client.complete(chat(max_tokens=40, ignore_eos=True, temperature=1.3, top_k=1, seed=5),
                                      timeout=60).token_ids
    assert greedy == expected
    assert top_k_one == expected


@pytest.mark.slow
def test_logprobs_equal_the_reference_log_softmax(stack, hf_reference):
    tokenizer, model = hf_reference
    result = stack.client.complete(chat(max_tokens=12, ignore_eos=True, logprobs=True, top_logprobs=5), timeout=60)
    prompt_ids, _ = reference_tokens(hf_reference, "chat", QUESTION)
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + result.token_ids[:-1]])).logits[0, len(prompt_ids) - 1 :]
    reference = torch.log_softmax(logits.float(), dim=-1)
    assert len(result.logprobs) == len(result.token_ids) == 12
    for position, entry in enumerate(result.logprobs):
        assert entry.token_id == result.token_ids[position]
        assert entry.logprob == pytest.approx(reference[position, entry.token_id].item(), abs=1e-3)
        top_values, top_ids = reference[position].topk(5)
        assert list(entry.top_logprobs) == pytest.approx(top_values.tolist(), abs=1e-3)
        assert entry.top_token_ids[0] == top_ids[0].item() == entry.token_id  # greedy picks the most likely


@pytest.mark.slow
def test_min_tokens_keeps_end_of_sequence_away(stack):
    short = stack.client.complete(chat("Reply with just the word yes.", max_tokens=96), timeout=60)
    assert short.finish_reason == "FINISH_REASON_STOP" and short.token_ids[-1] == 2
    floor = len(short.token_ids) + 15
    longer = stack.client.complete(chat("Reply with just the word yes.", max_tokens=96, min_tokens=floor), timeout=60)
    assert len(longer.token_ids) >= floor
    assert 2 not in longer.token_ids[:floor - 1]


@pytest.mark.slow
def test_penalties_reduce_repetition(stack):
    prompt = "Repeat after me forever: the cat sat on the mat, the cat sat on the mat, the cat sat on the mat,"
    plain = stack.client.complete(G(prompt=prompt, max_tokens=48, ignore_eos=True), timeout=60).token_ids
    penalised = stack.client.complete(G(prompt=prompt, max_tokens=48, ignore_eos=True, frequency_penalty=2.0,
                                        presence_penalty=1.0), timeout=60).token_ids
    repeated = stack.client.complete(G(prompt=prompt, max_tokens=48, ignore_eos=True, repetition_penalty=1.8),
                                     timeout=60).token_ids
    assert len(set(penalised)) > len(set(plain))
    assert len(set(repeated)) > len(set(plain))


@pytest.mark.slow
def test_complete_returns_what_generate_streams(stack):
    request = chat(max_tokens=20, ignore_eos=True)
    streamed = stack.client.complete(request, timeout=60)
    unary = stack.client.complete_unary(request, timeout=60)
    assert list(unary.token_ids) == streamed.token_ids and unary.text == streamed.text
    assert unary.usage.completion_tokens == 20 and unary.timings.total_seconds > 0
    assert unary.timings.time_to_first_token_seconds <= unary.timings.total_seconds


@pytest.mark.slow
def test_abort_ends_the_stream_with_abort_and_frees_blocks(stack):
    request = chat("Tell me a very long story.", max_tokens=1500, ignore_eos=True, request_id="abort-me-1")
    responses: list[generation_pb2.GenerateResponse] = []
    reader = threading.Thread(target=lambda: responses.extend(stack.client.stream(request, timeout=120)))
    reader.start()
    deadline = time.monotonic() + 30
    while len(responses) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stack.client.abort("abort-me-1") is True
    reader.join(30)
    assert responses[-1].finish_reason == common_pb2.FINISH_REASON_ABORT
    assert stack.client.abort("abort-me-1") is False  # already gone
    idle = stack.wait_idle()
    assert idle.kv_blocks_free == idle.kv_blocks_total


@pytest.mark.slow
def test_another_tenant_cannot_abort_a_request(stack):
    from services.client import InflightClient

    owner = InflightClient(stack.address, tenant="alpha")
    other = InflightClient(stack.address, tenant="beta")
    try:
        stream = owner.stream(chat(max_tokens=400, ignore_eos=True, request_id="tenant-owned"), timeout=120)
        next(stream)
        assert other.abort("tenant-owned") is False
        assert owner.abort("tenant-owned") is True
        assert [r.finish_reason for r in stream][-1] == common_pb2.FINISH_REASON_ABORT
    finally:
        owner.close()
        other.close()


@pytest.mark.slow
def test_model_info_tokenize_detokenize(stack, hf_reference):
    tokenizer, _ = hf_reference
    info = stack.client.model_info()
    assert info.model_name == "SmolLM2-135M-Instruct" and info.context_length == 8192
    assert info.vocab_size == 49152 and list(info.eos_token_ids) == [2] and info.tp_size == 1
    assert info.engine == "torch" and info.has_chat_template
    tokens = stack.client.tokenize(prompt="Hello world, 12 cats!")
    assert list(tokens.token_ids) == tokenizer("Hello world, 12 cats!")["input_ids"]
    assert tokens.tokens[0] == "Hello"
    assert stack.client.detokenize(tokens.token_ids) == "Hello world, 12 cats!"
    with pytest.raises(grpc.RpcError) as raised:
        stack.client.detokenize([1, 10**6])
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and raised.value.details().startswith("token_ids[1]")


@pytest.mark.slow
def test_grpcurl_drives_complete_abort_model_info_and_health(stack):
    body = '{"messages":[{"role":"user","content":"What is the capital of France?"}],"max_tokens":16}'
    complete = grpcurl("-d", body, stack.address, "inflight.v1.Generation/Complete")
    assert complete.returncode == 0, complete.stderr
    assert "Paris" in parse_stream(complete.stdout)[0]["text"]
    info = grpcurl(stack.address, "inflight.v1.Generation/ModelInfo")
    assert info.returncode == 0 and parse_stream(info.stdout)[0]["context_length"] == 8192
    abort = grpcurl("-d", '{"request_id":"nothing-here"}', stack.address, "inflight.v1.Generation/Abort")
    assert abort.returncode == 0 and parse_stream(abort.stdout)[0] == {}  # found: false is the default
    health = grpcurl("-d", '{"service":"inflight.v1.Generation"}', stack.address, "grpc.health.v1.Health/Check")
    assert health.returncode == 0 and parse_stream(health.stdout)[0]["status"] == "SERVING"


@pytest.mark.slow
def test_asyncio_client_streams_concurrently_and_completes(stack):
    import asyncio

    from services.client import AsyncInflightClient

    async def scenario():
        client = AsyncInflightClient(stack.address)
        try:
            results = await asyncio.gather(*(client.complete(chat(f"Say hello number {i}.", max_tokens=8, ignore_eos=True),
                                                             timeout=60) for i in range(4)))
            info = await client.model_info()
            stats = await client.stats()
            return results, info, stats
        finally:
            await client.close()

    results, info, stats = asyncio.run(scenario())
    assert all(len(r.token_ids) == 8 and r.finish_reason == "FINISH_REASON_LENGTH" for r in results)
    assert info.vocab_size == 49152 and stats.kv_blocks_total == 255
