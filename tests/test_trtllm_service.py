"""TensorRT-LLM's gRPC service, driven over loopback with the stubs smg-grpc-proto publishes."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from smg_grpc_proto.generated import trtllm_service_pb2 as trtllm
from smg_grpc_proto.generated import trtllm_service_pb2_grpc

from inflight.v1 import generation_pb2

PROMPT = "The history of the printing press begins"
MAX_TOKENS = 24


@pytest.fixture
def stub(stack):  # noqa: ANN001, ANN201
    with grpc.insecure_channel(stack.address) as channel:
        yield trtllm_service_pb2_grpc.TrtllmServiceStub(channel)


def reference(stack, max_tokens: int = MAX_TOKENS) -> tuple[list[int], list[int]]:  # noqa: ANN001
    """(prompt ids, greedy output ids) through inflight.v1.Generation."""
    prompt_ids = list(stack.client.tokenize(prompt=PROMPT).token_ids)
    done = stack.client.complete(generation_pb2.GenerateRequest(prompt=PROMPT, max_tokens=max_tokens), timeout=120)
    return prompt_ids, list(done.token_ids)


def request(prompt_ids: list[int], streaming: bool, max_tokens: int = MAX_TOKENS, **fields: object) -> trtllm.GenerateRequest:
    return trtllm.GenerateRequest(request_id=fields.pop("request_id", "t1"), max_tokens=max_tokens, streaming=streaming,
                                  tokenized=trtllm.TokenizedInput(input_token_ids=prompt_ids), **fields)


@pytest.mark.slow
def test_streaming_generate_gives_generates_tokens_as_chunks_then_one_complete(stack, stub) -> None:
    prompt_ids, expected = reference(stack)
    responses = list(stub.Generate(request(prompt_ids, streaming=True), timeout=120))
    *chunks, last = responses
    assert chunks and all(r.WhichOneof("response") == "chunk" for r in chunks)
    assert [t for r in chunks for t in r.chunk.token_ids] == expected
    assert last.WhichOneof("response") == "complete" and list(last.complete.output_token_ids) == expected
    assert last.complete.finish_reason == ("length" if len(expected) == MAX_TOKENS else "stop")
    assert (last.complete.prompt_tokens, last.complete.completion_tokens) == (len(prompt_ids), len(expected))
    assert all(r.request_id == "t1" for r in responses)


@pytest.mark.slow
def test_non_streaming_generate_gives_one_complete_with_logprobs_when_asked(stack, stub) -> None:
    prompt_ids, expected = reference(stack)
    config = trtllm.OutputConfig(logprobs=2)
    (only,) = list(stub.Generate(request(prompt_ids, streaming=False, output_config=config), timeout=120))
    assert list(only.complete.output_token_ids) == expected
    assert [p.token_id for p in only.complete.logprobs] == expected
    assert all(len(p.top_logprobs) == 2 and p.logprob <= 0 for p in only.complete.logprobs)


@pytest.mark.slow
@pytest.mark.parametrize("fields,named", [
    ({"sampling_config": trtllm.SamplingConfig(beam_width=2)}, "beam_width"),
    ({"sampling_config": trtllm.SamplingConfig(num_return_sequences=2)}, "num_return_sequences"),
    ({"bad": ["press"]}, "bad"),
    ({"lora_config": trtllm.LoraConfig()}, "lora_config"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"sampling_config": trtllm.SamplingConfig(temperature=-1.0)}, "temperature"),
])
def test_requests_this_server_cannot_serve_are_refused_naming_the_field(stack, stub, fields, named) -> None:
    prompt_ids, _ = reference(stack, max_tokens=1)
    max_tokens = fields.pop("max_tokens", MAX_TOKENS)
    with pytest.raises(grpc.RpcError) as refused:
        list(stub.Generate(request(prompt_ids, True, max_tokens, **fields), timeout=60))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and named in refused.value.details()


@pytest.mark.slow
def test_token_ids_outside_the_vocabulary_or_none_are_refused(stack, stub) -> None:
    for ids in ([5, 49152], []):
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Generate(request(ids, True), timeout=60))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.slow
def test_abort_ends_a_running_request_and_frees_its_blocks(stack, stub) -> None:
    prompt_ids, _ = reference(stack, max_tokens=1)
    got: list[trtllm.GenerateResponse] = []
    ended: dict[str, object] = {}

    def consume() -> None:
        try:
            for response in stub.Generate(request(prompt_ids, True, 3000, request_id="long", ignore_eos=True),
                                          timeout=120):
                got.append(response)
        except grpc.RpcError as error:
            ended["code"] = error.code()

    reader = threading.Thread(target=consume)
    reader.start()
    deadline = time.monotonic() + 60
    while not got and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stub.Abort(trtllm.AbortRequest(request_id="long"), timeout=10).success
    reader.join(30)
    assert not reader.is_alive()
    assert len(got) < 3000 and not any(r.WhichOneof("response") == "complete" and
                                       r.complete.finish_reason == "length" for r in got)
    idle = stack.wait_idle()
    assert idle.kv_blocks_free == idle.kv_blocks_total
    assert not stub.Abort(trtllm.AbortRequest(request_id="long"), timeout=10).success


@pytest.mark.slow
def test_health_model_and_server_info(stack, stub) -> None:
    assert stub.HealthCheck(trtllm.HealthCheckRequest(), timeout=10).status == "OK"
    info = stub.GetModelInfo(trtllm.GetModelInfoRequest(), timeout=10)
    assert info.vocab_size == 49152 and info.max_seq_len > info.max_input_len > 0 and info.model_id
    assert stub.GetServerInfo(trtllm.GetServerInfoRequest(), timeout=10).tensor_parallel_size == 1


@pytest.mark.slow
def test_fuzzed_requests_get_tokens_or_invalid_argument_and_nothing_else_is_harmed(stack, stub) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    floats = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True, width=32))
    sampling = st.builds(
        lambda beam, n, top_k, top_p, seed, temperature, min_tokens, penalty, min_p: trtllm.SamplingConfig(
            beam_width=beam, num_return_sequences=n, **{k: v for k, v in dict(
                top_k=top_k, top_p=top_p, seed=seed, temperature=temperature, min_tokens=min_tokens,
                repetition_penalty=penalty, min_p=min_p).items() if v is not None}),
        st.integers(0, 3), st.integers(0, 2), st.one_of(st.none(), st.integers(-5, 60000)), floats,
        st.one_of(st.none(), st.integers(0, 2**64 - 1)), floats, st.one_of(st.none(), st.integers(0, 10)), floats,
        floats)
    requests = st.builds(
        lambda ids, max_tokens, streaming, config, stop, stop_ids, logprobs: trtllm.GenerateRequest(
            tokenized=trtllm.TokenizedInput(input_token_ids=ids), max_tokens=max_tokens, streaming=streaming,
            sampling_config=config, stop=stop, stop_token_ids=stop_ids,
            output_config=trtllm.OutputConfig(**({} if logprobs is None else {"logprobs": logprobs}))),
        st.lists(st.integers(0, 60000), max_size=12), st.integers(0, 4), st.booleans(), sampling,
        st.lists(st.text(max_size=6), max_size=3), st.lists(st.integers(0, 60000), max_size=3),
        st.one_of(st.none(), st.integers(-2, 30)))

    @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(requests)
    def check(fuzzed: trtllm.GenerateRequest) -> None:
        try:
            responses = list(stub.Generate(fuzzed, timeout=60))
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
            assert error.details()
        else:
            assert responses[-1].WhichOneof("response") == "complete"
            assert len(responses[-1].complete.output_token_ids) <= fuzzed.max_tokens

    check()
    idle = stack.wait_idle()
    assert idle.kv_blocks_free == idle.kv_blocks_total
    assert stub.HealthCheck(trtllm.HealthCheckRequest(), timeout=10).status == "OK"


@pytest.mark.slow
def test_get_tokenizer_streams_the_model_folders_tokenizer_as_a_zip_with_its_digest(stack, stub, model_dir) -> None:
    import hashlib
    import io
    import zipfile

    from smg_grpc_proto.generated import common_pb2 as smg_common

    chunks = list(stub.GetTokenizer(smg_common.GetTokenizerRequest(), timeout=60))
    data = b"".join(c.data for c in chunks)
    assert [bool(c.sha256) for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1].sha256 == hashlib.sha256(data).hexdigest()
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert "model.safetensors" not in archive.namelist()
        assert archive.read("tokenizer.json") == (model_dir / "tokenizer.json").read_bytes()
        assert archive.read("tokenizer_config.json") == (model_dir / "tokenizer_config.json").read_bytes()
