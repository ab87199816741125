"""Triton's KServe v2 protocol, driven by tritonclient's own gRPC client against the running stack."""

from __future__ import annotations

import queue
import time
from functools import partial

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from inflight.v1 import generation_pb2

PROMPT = "The history of the printing press begins"
MAX_TOKENS = 24


def tensor(name: str, value: object, datatype: str) -> triton.InferInput:
    array = np.array([[value]], dtype=object if datatype == "BYTES" else {"INT32": np.int32, "BOOL": bool,
                                                                            "FP32": np.float32}[datatype])
    item = triton.InferInput(name, list(array.shape), datatype)
    item.set_data_from_numpy(array)
    return item


def inputs(prompt: str = PROMPT, max_tokens: int = MAX_TOKENS, stream: bool = True) -> list[triton.InferInput]:
    return [tensor("text_input", prompt.encode(), "BYTES"), tensor("max_tokens", max_tokens, "INT32"),
            tensor("stream", stream, "BOOL")]


@pytest.fixture
def client(stack):  # noqa: ANN001, ANN201
    client = triton.InferenceServerClient(stack.address)
    yield client
    client.close()


def generate_text(stack, prompt: str = PROMPT, max_tokens: int = MAX_TOKENS) -> str:  # noqa: ANN001
    return stack.client.complete(generation_pb2.GenerateRequest(prompt=prompt, max_tokens=max_tokens), timeout=120).text


def collect(responses: queue.Queue, until_final: int, timeout: float = 120) -> list[tuple[object, object]]:
    got, finals, deadline = [], 0, time.monotonic() + timeout
    while finals < until_final:
        result, error = responses.get(timeout=max(0.1, deadline - time.monotonic()))
        got.append((result, error))
        if error is not None or result.get_response().parameters["triton_final_response"].bool_param:
            finals += 1
    return got


@pytest.mark.slow
def test_the_streaming_client_gets_generates_text_then_an_empty_final_response(stack, client) -> None:
    expected = generate_text(stack)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer("ensemble", inputs(), request_id="k1", enable_empty_final_response=True)
        got = collect(responses, 1)
    finally:
        client.stop_stream()
    assert all(error is None for _, error in got)
    *texts, final = got
    assert final[0].get_response().parameters["triton_final_response"].bool_param
    assert final[0].as_numpy("text_output") is None  # the empty final response
    assert len(texts) > 1 and all(not r.get_response().parameters["triton_final_response"].bool_param for r, _ in texts)
    assert "".join(r.as_numpy("text_output").reshape(-1)[0].decode() for r, _ in texts) == expected
    assert all(r.get_response().id == "k1" for r, _ in got)


@pytest.mark.slow
def test_health_and_the_decoupled_model_config_answer(stack, client) -> None:
    assert client.is_server_live() and client.is_server_ready()
    for name in ("ensemble", "tensorrt_llm_bls"):
        assert client.is_model_ready(name)
    assert not client.is_model_ready("no-such-model")
    config = client.get_model_config("ensemble", as_json=True)["config"]
    assert config["model_transaction_policy"]["decoupled"] is True
    assert {"text_input", "max_tokens"} <= {i["name"] for i in config["input"]}
    assert "text_output" in {o["name"] for o in client.get_model_metadata("ensemble", as_json=True)["outputs"]}
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.get_model_config("no-such-model")


@pytest.mark.slow
def test_a_bad_tensor_gets_an_in_band_error_and_the_stream_keeps_serving(stack, client) -> None:
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        wrong_type = [tensor("text_input", 7, "INT32"), tensor("max_tokens", 4, "INT32")]
        client.async_stream_infer("ensemble", wrong_type, request_id="bad-type")
        client.async_stream_infer("ensemble", [tensor("max_tokens", 4, "INT32")], request_id="no-text")
        client.async_stream_infer("ensemble", inputs(max_tokens=0), request_id="zero-tokens")
        errors = [error for _, error in collect(responses, 3)]
        assert all(error is not None for error in errors)
        messages = " | ".join(str(error) for error in errors)
        assert "text_input" in messages and "max_tokens" in messages
        client.async_stream_infer("ensemble", inputs(max_tokens=8), request_id="good")
        good = collect(responses, 1)
    finally:
        client.stop_stream()
    assert all(error is None for _, error in good)
    assert "".join(r.as_numpy("text_output").reshape(-1)[0].decode() for r, _ in good) == generate_text(stack, max_tokens=8)


@pytest.mark.slow
def test_unary_infer_returns_the_prompt_and_the_text_unless_told_to_exclude_the_input(stack, client) -> None:
    expected = generate_text(stack)
    whole = client.infer("ensemble", inputs(stream=False)).as_numpy("text_output").reshape(-1)[0].decode()
    assert whole == PROMPT + expected
    request = [*inputs(stream=False), tensor("exclude_input_in_output", True, "BOOL"),
               tensor("return_num_output_tokens", True, "BOOL")]
    result = client.infer("tensorrt_llm_bls", request)
    assert result.as_numpy("text_output").reshape(-1)[0].decode() == expected
    assert int(result.as_numpy("num_output_tokens").reshape(-1)[0]) == MAX_TOKENS


@pytest.mark.slow
def test_typed_contents_work_as_raw_ones_do(stack) -> None:
    request = service_pb2.ModelInferRequest(model_name="ensemble", id="typed")
    request.inputs.add(name="text_input", datatype="BYTES", shape=[1, 1]).contents.bytes_contents.append(PROMPT.encode())
    request.inputs.add(name="max_tokens", datatype="INT32", shape=[1, 1]).contents.int_contents.append(MAX_TOKENS)
    request.inputs.add(name="exclude_input_in_output", datatype="BOOL", shape=[1, 1]).contents.bool_contents.append(True)
    with grpc.insecure_channel(stack.address) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=120)
        with pytest.raises(grpc.RpcError) as refused:
            bad = service_pb2.ModelInferRequest(model_name="ensemble")
            bad.inputs.add(name="text_input", datatype="BYTES", shape=[1]).contents.bytes_contents.append(PROMPT.encode())
            bad.inputs.add(name="bad_words", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"press")
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(bad, timeout=30)
    raw = response.raw_output_contents[0]
    assert raw[4:].decode() == generate_text(stack)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "bad_words" in refused.value.details()


@pytest.mark.slow
def test_stopping_the_stream_aborts_its_requests_and_frees_every_block(stack, client) -> None:
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=partial(lambda q, result, error: q.put((result, error)), responses))
    for i in range(3):
        client.async_stream_infer("ensemble", inputs(max_tokens=2000), request_id=f"long-{i}")
    responses.get(timeout=120)  # generation has begun
    client.stop_stream(cancel_requests=True)
    idle = stack.wait_idle()
    assert idle.kv_blocks_free == idle.kv_blocks_total
    assert generate_text(stack, max_tokens=4)  # and the stack serves on


_TYPES = ["BYTES", "BOOL", "INT8", "INT32", "INT64", "UINT32", "UINT64", "FP16", "FP32", "FP64", "STRING", ""]
_NAMES = ["text_input", "max_tokens", "stream", "temperature", "top_k", "top_p", "seed", "min_length",
          "stop_words", "bad_words", "exclude_input_in_output", "return_log_probs", "other"]


def add_tensors(request: service_pb2.ModelInferRequest, tensors: list[tuple[str, str, bytes, list[int]]],
                raw: bool, framed: bool = True) -> None:
    """Fuzzed (name, datatype, payload, numbers) tensors, as raw_input_contents or as typed contents.

    Raw and framed, a BYTES text_input is length-prefixed and an INT32 max_tokens is its first number (its
    low 32 bits), as a well-formed request would send them; every other raw tensor is its payload as it is.
    """
    for name, datatype, payload, numbers in tensors:
        item = request.inputs.add(name=name, datatype=datatype, shape=[1, 1])
        if raw and framed and (name, datatype) == ("text_input", "BYTES"):
            request.raw_input_contents.append(len(payload).to_bytes(4, "little") + payload)
        elif raw and framed and (name, datatype) == ("max_tokens", "INT32"):
            request.raw_input_contents.append(((numbers[0] if numbers else 0) % 2**32).to_bytes(4, "little"))
        elif raw:
            request.raw_input_contents.append(payload)
        elif datatype in ("BYTES", "STRING"):
            item.contents.bytes_contents.append(payload)
        elif datatype in ("INT32", "INT8"):
            item.contents.int_contents.extend(n for n in numbers if -2**31 <= n < 2**31)
        elif datatype == "INT64":
            item.contents.int64_contents.extend(n for n in numbers if -2**63 <= n < 2**63)
        elif datatype == "FP32":
            item.contents.fp32_contents.extend(float(n % 1000) for n in numbers)


@pytest.mark.parametrize("seed", range(3))
def test_any_request_maps_to_a_generation_or_a_bad_tensor_error(seed: int) -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from services.gateway.kserve import BadTensor, to_inference

    tensor_strategy = st.tuples(st.sampled_from(_NAMES), st.sampled_from(_TYPES), st.binary(max_size=24),
                                st.lists(st.integers(-2**70, 2**70), max_size=3))

    @settings(max_examples=150, deadline=None, database=None, derandomize=False)
    @given(st.lists(tensor_strategy, max_size=6), st.booleans(), st.integers(0, 2**32))
    def check(tensors, raw, salt):  # type: ignore[no-untyped-def]
        request = service_pb2.ModelInferRequest(model_name="ensemble", id=str(salt + seed))
        add_tensors(request, tensors, raw, framed=False)  # raw payloads as they came: bad framing too
        try:
            inference = to_inference(request)
        except BadTensor as error:
            assert str(error)
        else:
            assert inference.request.max_tokens >= 1 and isinstance(inference.request.prompt, str)

    check()


@pytest.mark.slow
def test_bytes_that_do_not_parse_get_invalid_argument_and_the_stack_serves_on(stack) -> None:
    with grpc.insecure_channel(stack.address) as channel:
        for method in ("ModelInfer", "ModelConfig", "ModelReady"):
            call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}",
                                       request_serializer=lambda b: b, response_deserializer=lambda b: b)
            for garbage in (b"\xff\xfe\x01", b"\x0a\x05ab", b"\x12\x80"):
                with pytest.raises(grpc.RpcError) as refused:
                    call(garbage, timeout=30)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert generate_text(stack, max_tokens=4)


@pytest.mark.slow
def test_fuzzed_requests_against_the_stack_get_outputs_or_invalid_argument_and_nothing_else_is_harmed(stack) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    def small_numbers(name: str) -> st.SearchStrategy[list[int]]:  # the stack really generates: keep it short
        return st.lists(st.integers(-3, 6) if name == "max_tokens" else st.integers(-2**40, 2**40), max_size=3)

    tensor_strategy = st.sampled_from(_NAMES).flatmap(lambda name: st.tuples(
        st.just(name), st.sampled_from(_TYPES), st.binary(max_size=12), small_numbers(name)))

    with grpc.insecure_channel(stack.address) as channel:
        infer = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer

        @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(st.lists(tensor_strategy, max_size=4), st.booleans(), st.sampled_from([True, True, False]),
               st.integers(0, 2), st.sampled_from(["ensemble", "ensemble", "tensorrt_llm_bls", "nope"]))
        def check(tensors, raw, well_formed_start, extra, model):  # type: ignore[no-untyped-def]
            request = service_pb2.ModelInferRequest(model_name=model)
            if well_formed_start:  # most requests then reach a generation, with the fuzzed tensors after
                tensors = [("text_input", "BYTES", b"Tell me", []), ("max_tokens", "INT32", b"", [3]),
                           *[t for t in tensors if t[0] not in ("text_input", "max_tokens")][:extra // 2]]
            add_tensors(request, tensors, raw)
            try:
                reply = infer(request, timeout=60)
            except grpc.RpcError as error:
                assert error.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), error.code()
                assert error.details()
            else:
                assert any(o.name == "text_output" for o in reply.outputs)

        check()
    idle = stack.wait_idle()
    assert idle.kv_blocks_free == idle.kv_blocks_total
    assert generate_text(stack, max_tokens=4)
