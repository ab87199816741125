"""Triton's KServe v2 gRPC protocol (`inference.GRPCInferenceService`), as Triton serves the TensorRT-LLM backend.

Clients built for Triton + TensorRT-LLM (tritonclient, perf_analyzer / genai-perf `--endpoint-type
kserve`) work unchanged: one decoupled model named `ensemble`, also reachable as `tensorrt_llm_bls` and
by the served model's own id, takes `text_input` and sampling tensors and answers `text_output`.
Every inference becomes a `GenerateRequest` run by the gateway's own GenerationService, so admission,
validation, metrics and aborts are the same as for `inflight.v1.Generation`.

- `ModelStreamInfer` (bidirectional): each request runs concurrently; a request's error goes back
  in-band (`error_message`) and the stream keeps serving. With `stream` true, responses carry text
  deltas; otherwise one response carries the whole text (prefixed with the prompt unless
  `exclude_input_in_output`, as the ensemble does). The last response has `triton_final_response`
  set; with `triton_enable_empty_final_response` an empty final response follows the last text.
  Cancelling the stream aborts its requests.
- `ModelInfer` (unary): one whole response.
- Tensors arrive typed (`contents`) or as `raw_input_contents` (BYTES elements length-prefixed,
  numbers little-endian), the two ways tritonclient sends them.

The stubs are tritonclient's generated ones (`tritonclient.grpc.service_pb2`), never a copy of the
upstream .proto files; `tritonclient` is an optional dependency (`pip install inflight[kserve]`).
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import structlog
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from inflight.v1 import generation_pb2
from services.gateway.generation import GenerationService, Rejected

log = structlog.get_logger()

ENSEMBLE = "ensemble"
ALIASES = ("tensorrt_llm_bls",)
FINAL = "triton_final_response"
EMPTY_FINAL = "triton_enable_empty_final_response"
UNSUPPORTED = ("bad_words", "embedding_bias_words", "embedding_bias_weights", "lora_task_id", "lora_weights",
               "lora_config", "prompt_embedding_table", "guided_decoding_guide_type", "guided_decoding_guide")

_NUMPY = {"BOOL": np.bool_, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
          "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
          "FP16": np.float16, "FP32": np.float32, "FP64": np.float64}
_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
             "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
             "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
             "FP64": "fp64_contents", "BYTES": "bytes_contents"}

# (name, datatype, optional) of the ensemble's inputs, and its outputs: what ModelMetadata and ModelConfig declare.
INPUTS = [("text_input", "BYTES", False), ("max_tokens", "INT32", False), ("stream", "BOOL", True),
          ("streaming", "BOOL", True), ("temperature", "FP32", True), ("top_k", "INT32", True),
          ("top_p", "FP32", True), ("min_tokens", "INT32", True), ("min_length", "INT32", True),
          ("repetition_penalty", "FP32", True), ("presence_penalty", "FP32", True),
          ("frequency_penalty", "FP32", True), ("seed", "UINT64", True), ("random_seed", "UINT64", True),
          ("stop_words", "BYTES", True), ("bad_words", "BYTES", True), ("end_id", "INT32", True),
          ("exclude_input_in_output", "BOOL", True), ("return_log_probs", "BOOL", True),
          ("return_num_input_tokens", "BOOL", True), ("return_num_output_tokens", "BOOL", True)]
OUTPUTS = [("text_output", "BYTES"), ("num_input_tokens", "INT32"), ("num_output_tokens", "INT32"),
           ("cum_log_probs", "FP32"), ("output_log_probs", "FP32")]


class BadTensor(ValueError):
    """An input the ensemble would refuse; its message goes back to the client as is."""


def _bytes_elements(raw: bytes) -> list[bytes]:
    elements, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise BadTensor("BYTES tensor: truncated length prefix")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise BadTensor("BYTES tensor: element runs past the end")
        elements.append(raw[offset : offset + length])
        offset += length
    return elements


def _serialize_bytes(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def read_inputs(request: service_pb2.ModelInferRequest) -> dict[str, list[Any]]:
    """Each input tensor's elements, flattened, from typed contents or raw_input_contents."""
    if request.raw_input_contents and len(request.raw_input_contents) != len(request.inputs):
        raise BadTensor(f"raw_input_contents has {len(request.raw_input_contents)} entries for "
                        f"{len(request.inputs)} inputs")
    values: dict[str, list[Any]] = {}
    for index, tensor in enumerate(request.inputs):
        kind = tensor.datatype
        if kind not in _CONTENTS:
            raise BadTensor(f"input '{tensor.name}': datatype {kind!r} is not supported")
        if request.raw_input_contents:
            raw = request.raw_input_contents[index]
            if kind == "BYTES":
                values[tensor.name] = _bytes_elements(raw)
            else:
                dtype = np.dtype(_NUMPY[kind]).newbyteorder("<")
                if len(raw) % dtype.itemsize:
                    raise BadTensor(f"input '{tensor.name}': {len(raw)} bytes do not hold {kind} elements")
                values[tensor.name] = np.frombuffer(raw, dtype=dtype).tolist()
        else:
            values[tensor.name] = list(getattr(tensor.contents, _CONTENTS[kind]))
    return values


@dataclass
class Inference:
    """One KServe request as a generation, and how to shape its responses."""

    request: generation_pb2.GenerateRequest
    streaming: bool
    exclude_input: bool
    counts: tuple[bool, bool]  # return_num_input_tokens, return_num_output_tokens
    log_probs: bool


def _one(values: dict[str, list[Any]], name: str, kind: type, default: Any = None) -> Any:
    if name not in values:
        return default
    elements = values[name]
    if len(elements) != 1:
        raise BadTensor(f"input '{name}': expected one element, got {len(elements)}")
    value = elements[0]
    try:
        if kind is str:
            return value.decode("utf-8") if isinstance(value, bytes) else str(value)
        return kind(value)
    except (UnicodeDecodeError, ValueError, TypeError) as error:
        raise BadTensor(f"input '{name}': {error}") from None


def _set(generate: generation_pb2.GenerateRequest, field: str, value: Any, name: str) -> None:
    try:
        setattr(generate, field, value)
    except (ValueError, TypeError):  # out of the field's range (a negative count, a seed past 64 bits)
        raise BadTensor(f"input '{name}': {value!r} is out of range") from None


def to_inference(request: service_pb2.ModelInferRequest) -> Inference:
    """The generation a request asks for; streaming only when its `stream`/`streaming` input says so."""
    declared = {name: kind for name, kind, _ in INPUTS}
    for tensor in request.inputs:
        if tensor.name in declared and tensor.datatype != declared[tensor.name] and not (
                declared[tensor.name].startswith(("INT", "UINT")) and tensor.datatype.startswith(("INT", "UINT"))):
            raise BadTensor(f"input '{tensor.name}': datatype {tensor.datatype}, expected {declared[tensor.name]}")
    values = read_inputs(request)
    if "text_input" not in values:
        raise BadTensor("input 'text_input' is required")
    for name in UNSUPPORTED:
        if any(values.get(name, [])):
            raise BadTensor(f"input '{name}' is not supported by this server")
    generate = generation_pb2.GenerateRequest(prompt=_one(values, "text_input", str), request_id=request.id)
    max_tokens = _one(values, "max_tokens", int)
    if max_tokens is None or max_tokens < 1:
        raise BadTensor("input 'max_tokens' is required, and must be at least 1")
    _set(generate, "max_tokens", max_tokens, "max_tokens")
    for name in ("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        value = _one(values, name, float)
        if value is not None:
            _set(generate, name, value, name)
    top_k = _one(values, "top_k", int)
    if top_k:  # the ensemble's 0 means no limit
        _set(generate, "top_k", top_k, "top_k")
    min_name = "min_tokens" if "min_tokens" in values else "min_length"
    min_tokens = _one(values, min_name, int)
    if min_tokens:
        _set(generate, "min_tokens", min_tokens, min_name)
    seed_name = "seed" if "seed" in values else "random_seed"
    seed = _one(values, seed_name, int)
    if seed is not None:
        _set(generate, "seed", seed, seed_name)
    stops = [s.decode("utf-8", "replace") if isinstance(s, bytes) else str(s) for s in values.get("stop_words", [])]
    generate.stop.extend(s for s in stops if s)
    log_probs = bool(_one(values, "return_log_probs", bool, False))
    if log_probs:
        generate.logprobs = True
    streaming = _one(values, "stream", bool, _one(values, "streaming", bool, False))
    return Inference(generate, bool(streaming), bool(_one(values, "exclude_input_in_output", bool, False)),
                     (bool(_one(values, "return_num_input_tokens", bool, False)),
                      bool(_one(values, "return_num_output_tokens", bool, False))), log_probs)


def _response(request: service_pb2.ModelInferRequest, model_version: str, text: str | None,
              final: bool, numbers: dict[str, tuple[str, list[float | int]]]) -> service_pb2.ModelInferResponse:
    response = service_pb2.ModelInferResponse(model_name=request.model_name, model_version=model_version, id=request.id)
    if text is not None:
        response.outputs.add(name="text_output", datatype="BYTES", shape=[1, 1])
        response.raw_output_contents.append(_serialize_bytes([text.encode("utf-8")]))
        for name, (kind, elements) in numbers.items():
            response.outputs.add(name=name, datatype=kind, shape=[1, len(elements)])
            response.raw_output_contents.append(np.asarray(elements, dtype=_NUMPY[kind]).astype(
                np.dtype(_NUMPY[kind]).newbyteorder("<")).tobytes())
    response.parameters[FINAL].bool_param = final
    return response


class KServeService(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, generation: GenerationService) -> None:
        self.generation = generation

    # --- names and readiness ---------------------------------------------------------

    def _model_id(self) -> str:
        info = self.generation.scheduler.model_info
        return info.model_name if info is not None else ""

    def _known(self, name: str) -> bool:
        return name in (ENSEMBLE, *ALIASES) or (bool(name) and name == self._model_id())

    def _ready(self) -> bool:
        return self.generation.scheduler.model_info is not None and not self.generation.draining

    async def _check_model(self, name: str, version: str, context: grpc.aio.ServicerContext) -> None:
        if not self._known(name):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"Request for unknown model: '{name}' is not found")
        if version not in ("", "1"):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"Request for unknown model: '{name}' version {version} "
                                                           "is not found")

    async def ServerLive(self, request: service_pb2.ServerLiveRequest,
                         context: grpc.aio.ServicerContext) -> service_pb2.ServerLiveResponse:
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: service_pb2.ServerReadyRequest,
                          context: grpc.aio.ServicerContext) -> service_pb2.ServerReadyResponse:
        return service_pb2.ServerReadyResponse(ready=self._ready())

    async def ModelReady(self, request: service_pb2.ModelReadyRequest,
                         context: grpc.aio.ServicerContext) -> service_pb2.ModelReadyResponse:
        return service_pb2.ModelReadyResponse(ready=self._known(request.name) and request.version in ("", "1")
                                              and self._ready())

    async def ServerMetadata(self, request: service_pb2.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext) -> service_pb2.ServerMetadataResponse:
        return service_pb2.ServerMetadataResponse(name="inflight", version="0.1.0", extensions=[])

    async def ModelMetadata(self, request: service_pb2.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> service_pb2.ModelMetadataResponse:
        await self._check_model(request.name, request.version, context)
        tensor = service_pb2.ModelMetadataResponse.TensorMetadata
        return service_pb2.ModelMetadataResponse(
            name=request.name, versions=["1"], platform="ensemble",
            inputs=[tensor(name=n, datatype=k, shape=[-1, -1] if k == "BYTES" else [-1, 1]) for n, k, _ in INPUTS],
            outputs=[tensor(name=n, datatype=k, shape=[-1, -1]) for n, k in OUTPUTS])

    async def ModelConfig(self, request: service_pb2.ModelConfigRequest,
                          context: grpc.aio.ServicerContext) -> service_pb2.ModelConfigResponse:
        await self._check_model(request.name, request.version, context)
        types = model_config_pb2
        config = types.ModelConfig(
            name=request.name, platform="ensemble", max_batch_size=0,
            model_transaction_policy=types.ModelTransactionPolicy(decoupled=True),
            input=[types.ModelInput(name=n, data_type=types.DataType.Value(f"TYPE_{'STRING' if k == 'BYTES' else k}"),
                                    dims=[-1], optional=optional) for n, k, optional in INPUTS],
            output=[types.ModelOutput(name=n, data_type=types.DataType.Value(f"TYPE_{'STRING' if k == 'BYTES' else k}"),
                                      dims=[-1]) for n, k in OUTPUTS])
        return service_pb2.ModelConfigResponse(config=config)

    # --- inference ---------------------------------------------------------------------

    async def _run(self, request: service_pb2.ModelInferRequest, context: grpc.aio.ServicerContext,
                   unary: bool) -> AsyncIterator[service_pb2.ModelInferResponse]:
        """The responses of one inference; raises BadTensor or Rejected for an error."""
        if not self._known(request.model_name):
            raise BadTensor(f"Request for unknown model: '{request.model_name}' is not found")
        inference = to_inference(request)
        inference.streaming = inference.streaming and not unary  # a unary call has one response
        empty_final = request.parameters[EMPTY_FINAL].bool_param if EMPTY_FINAL in request.parameters else False
        text, log_probs = "", []
        usage = generation_pb2.Usage()
        pending: service_pb2.ModelInferResponse | None = None
        async for response in self.generation.stream(inference.request, context):
            log_probs += [p.logprob for p in response.logprobs]
            if response.finish_reason:
                usage = response.usage
            if inference.streaming:
                if pending is not None:
                    yield pending
                pending = _response(request, "1", response.text, False,
                                    self._numbers(inference, usage, log_probs, [p.logprob for p in response.logprobs]))
            else:
                text += response.text
        if not inference.streaming:
            full = text if inference.exclude_input else inference.request.prompt + text
            pending = _response(request, "1", full, False, self._numbers(inference, usage, log_probs, log_probs))
        if pending is None:  # a stream that produced nothing: still one final response
            yield _response(request, "1", None, True, {})
            return
        if empty_final:
            yield pending
            yield _response(request, "1", None, True, {})
        else:
            pending.parameters[FINAL].bool_param = True
            yield pending

    @staticmethod
    def _numbers(inference: Inference, usage: generation_pb2.Usage, all_log_probs: list[float],
                 step_log_probs: list[float]) -> dict[str, tuple[str, list[float | int]]]:
        numbers: dict[str, tuple[str, list[float | int]]] = {}
        wants_inputs, wants_outputs = inference.counts
        if wants_inputs:
            numbers["num_input_tokens"] = ("INT32", [usage.prompt_tokens])
        if wants_outputs:
            numbers["num_output_tokens"] = ("INT32", [usage.completion_tokens])
        if inference.log_probs:
            numbers["cum_log_probs"] = ("FP32", [float(sum(all_log_probs))])
            numbers["output_log_probs"] = ("FP32", list(step_log_probs))
        return numbers

    async def ModelInfer(self, request: service_pb2.ModelInferRequest,
                         context: grpc.aio.ServicerContext) -> service_pb2.ModelInferResponse:
        result = None
        try:
            async for response in self._run(request, context, unary=True):
                if response.outputs:
                    result = response
        except BadTensor as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except Rejected as rejected:
            await context.abort(rejected.code, rejected.message)
        if result is None:
            await context.abort(grpc.StatusCode.INTERNAL, "the generation gave no output")
        assert result is not None
        del result.parameters[FINAL]
        return result

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[service_pb2.ModelInferRequest],
                               context: grpc.aio.ServicerContext) -> AsyncIterator[service_pb2.ModelStreamInferResponse]:
        out: asyncio.Queue[service_pb2.ModelStreamInferResponse | None] = asyncio.Queue()
        tasks: set[asyncio.Task[None]] = set()

        async def serve(request: service_pb2.ModelInferRequest) -> None:
            try:
                async for response in self._run(request, context, unary=False):
                    await out.put(service_pb2.ModelStreamInferResponse(infer_response=response))
            except BadTensor as error:
                await out.put(self._error(request, str(error)))
            except Rejected as rejected:
                await out.put(self._error(request, f"{rejected.code.name}: {rejected.message}"))
            except asyncio.CancelledError:
                raise
            except Exception:  # one request's fault never ends the stream or its other requests
                log.exception("kserve_request_failed", request_id=request.id)
                await out.put(self._error(request, f"INTERNAL: the request {request.id!r} failed; see the server log"))

        async def read() -> None:
            try:
                async for request in request_iterator:
                    task = asyncio.create_task(serve(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if tasks:
                    await asyncio.gather(*tasks, return_exceptions=True)
            finally:
                await out.put(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await out.get()) is not None:
                yield item
        finally:  # the client went away (or the stream ended): its requests are aborted
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    @staticmethod
    def _error(request: service_pb2.ModelInferRequest, message: str) -> service_pb2.ModelStreamInferResponse:
        response = service_pb2.ModelInferResponse(model_name=request.model_name, id=request.id)
        response.parameters[FINAL].bool_param = True
        return service_pb2.ModelStreamInferResponse(error_message=message, infer_response=response)
