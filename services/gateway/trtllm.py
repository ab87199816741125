"""TensorRT-LLM's gRPC service (`trtllm.TrtllmService`), so routers that drive TensorRT-LLM workers (SMG) drive us.

The router tokenizes: a request carries token ids, sampling and output configuration, and gets back
token ids (streamed as delta `chunk`s, then one `complete` with every output id, the finish reason,
the matched stop and the token counts). Each request runs through the gateway's own
GenerationService, pre-tokenized, so admission, validation, metrics and aborts are the same as for
`inflight.v1.Generation`. Fields this server does not serve (beam search, several sequences, guided
decoding, LoRA, prompt tuning, multimodal input, bad words, embedding bias, lookahead,
disaggregated serving) are refused with INVALID_ARGUMENT naming the field.

`GetTokenizer` streams the model folder's tokenizer files as one zip, so a router needs no copy.
`SubscribeKvEvents` relays the scheduler's prefix-cache events (what it stored, with each block's
token ids, and what it dropped), so a router can place a request where its prefix is cached.

The stubs are the ones `smg-grpc-proto` publishes (an optional dependency: `pip install
inflight[trtllm]`), never a copy of the upstream .proto file.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from smg_grpc_proto.generated import common_pb2 as smg_common
from smg_grpc_proto.generated import trtllm_service_pb2 as trtllm
from smg_grpc_proto.generated import trtllm_service_pb2_grpc

from inflight.v1 import common_pb2, generation_pb2, scheduler_pb2
from services.gateway.generation import GenerationService, Rejected

FINISH_REASONS = {common_pb2.FINISH_REASON_LENGTH: "length", common_pb2.FINISH_REASON_STOP: "stop"}
# (field, what to call it) of request parts with no counterpart here; set, they are refused.
UNSERVED_OPTIONALS = ("guided_decoding", "lora_config", "prompt_tuning_config", "multimodal_input",
                      "lookahead_config", "disaggregated_params")


def _unserved(request: trtllm.GenerateRequest) -> str | None:
    sampling = request.sampling_config
    if sampling.beam_width > 1 or sampling.beam_width_array:
        return "sampling_config.beam_width: beam search is not served here"
    if sampling.num_return_sequences > 1:
        return "sampling_config.num_return_sequences: one sequence per request"
    for name in UNSERVED_OPTIONALS:
        if request.HasField(name):
            return f"{name}: not served here"
    if request.embedding_bias:
        return "embedding_bias: not served here"
    if request.bad or request.bad_token_ids:
        return "bad, bad_token_ids: bad words are not served here"
    if request.output_config.prompt_logprobs or request.output_config.return_context_logits \
            or request.output_config.return_generation_logits:
        return "output_config: prompt log-probabilities and logits are not served here"
    return None


def to_generate_request(request: trtllm.GenerateRequest) -> generation_pb2.GenerateRequest:
    sampling = request.sampling_config
    generate = generation_pb2.GenerateRequest(
        max_tokens=request.max_tokens, request_id=request.request_id, stop=list(request.stop),
        stop_token_ids=list(request.stop_token_ids), ignore_eos=request.ignore_eos)
    for name in ("temperature", "top_p", "seed", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        if sampling.HasField(name):
            setattr(generate, name, getattr(sampling, name))
    if sampling.HasField("top_k") and sampling.top_k > 0:
        generate.top_k = sampling.top_k
    if sampling.HasField("min_tokens"):
        generate.min_tokens = sampling.min_tokens
    if request.HasField("cache_salt_id"):
        generate.cache_salt = str(request.cache_salt_id)
    if request.output_config.HasField("logprobs") and request.output_config.logprobs >= 0:
        generate.logprobs = True
        generate.top_logprobs = request.output_config.logprobs
    return generate


def _logprobs(response: generation_pb2.GenerateResponse) -> list[trtllm.TokenLogprob]:
    return [trtllm.TokenLogprob(token_id=p.token_id, logprob=p.logprob,
                                top_logprobs=[trtllm.TopLogprob(token_id=token, logprob=logprob)
                                              for token, logprob in zip(p.top_token_ids, p.top_logprobs)])
            for p in response.logprobs]


def to_engine_load(load: scheduler_pb2.EngineLoad, sample: int, load_only: bool) -> smg_common.EngineLoad:
    # waiting_uncached_tokens, as SGLang defines it ("uncached input tokens waiting for prefill compute"),
    # counts a prefill under way too: it is what SMG's cache_aware balances on when no replica holds a prompt.
    return smg_common.EngineLoad(
        running_requests=load.running_requests, waiting_requests=load.waiting_requests,
        waiting_uncached_tokens=load.prefill_pending_tokens, token_usage=load.kv_usage,
        active_token_usage=load.kv_usage, max_running_requests=load.max_running_requests, sample=sample,
        load_only=load_only, prefill_pending_tokens=load.prefill_pending_tokens, num_used_tokens=load.used_tokens,
        max_total_num_tokens=load.total_tokens)


def to_kv_event_batch(batch: scheduler_pb2.KvEventBatch, sample: int = 0) -> smg_common.KvEventBatch:
    """sample: the load record's number on its stream (monotonic, as routers order them)."""
    out = smg_common.KvEventBatch(sequence_number=batch.sequence_number, timestamp=batch.timestamp,
                                  load=to_engine_load(batch.load, sample, batch.load_only))
    for index, event in enumerate(batch.events):
        # Unique: a batch (one step's) holds fewer than 4096 events; sequence numbers stay below 2**52.
        converted = out.events.add(event_id=batch.sequence_number * 4096 + index)
        kind = event.WhichOneof("data")
        if kind == "stored":
            stored = converted.stored
            stored.tier = smg_common.KV_CACHE_TIER_DEVICE
            if event.stored.HasField("parent_block_hash"):
                stored.parent_block_hash = event.stored.parent_block_hash
            if event.stored.cache_salt:
                stored.cache_salt = event.stored.cache_salt
            tenant = [smg_common.KvBlockExtraKey(text=event.stored.tenant)] if event.stored.tenant else []
            for block in event.stored.blocks:
                stored.blocks.add(block_hash=block.block_hash, token_ids=block.token_ids,
                                  block_size=block.block_size, extra_keys=tenant)
        elif kind == "removed":
            converted.removed.block_hashes.extend(event.removed.block_hashes)
            converted.removed.tier = smg_common.KV_CACHE_TIER_DEVICE
        else:
            converted.cleared.SetInParent()
    return out


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "config.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json")
TOKENIZER_CHUNK = 1 << 20


def tokenizer_zip(folder: Path) -> bytes:
    """The folder's tokenizer files (no weights) as a zip, as GetTokenizer sends them."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in TOKENIZER_FILES:
            if (folder / name).is_file():
                archive.write(folder / name, name)
    return buffer.getvalue()


class TrtllmService(trtllm_service_pb2_grpc.TrtllmServiceServicer):
    def __init__(self, generation: GenerationService, tokenizer_folder: Path | None = None) -> None:
        self.generation = generation
        self._tokenizer = tokenizer_zip(tokenizer_folder) if tokenizer_folder is not None else b""

    async def Generate(self, request: trtllm.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[trtllm.GenerateResponse]:
        problem = _unserved(request)
        if problem is None and not request.max_tokens:
            problem = "max_tokens: required, at least 1"
        if problem is None and not request.tokenized.input_token_ids:
            problem = "tokenized.input_token_ids: required (the router tokenizes)"
        if problem is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        generate = to_generate_request(request)
        prompt = list(request.tokenized.input_token_ids)
        outputs: list[int] = []
        logprobs: list[trtllm.TokenLogprob] = []
        try:
            async for response in self.generation.stream(generate, context, prompt_ids=prompt):
                outputs += response.token_ids
                chunk_logprobs = _logprobs(response) if generate.logprobs else []
                logprobs += chunk_logprobs
                if request.streaming and response.token_ids:
                    yield trtllm.GenerateResponse(request_id=response.request_id, chunk=trtllm.GenerateStreamChunk(
                        token_ids=response.token_ids, prompt_tokens=len(prompt), completion_tokens=len(outputs),
                        logprobs=chunk_logprobs))
                if response.finish_reason:
                    complete = trtllm.GenerateComplete(
                        output_token_ids=outputs, finish_reason=FINISH_REASONS.get(response.finish_reason, "stop"),
                        prompt_tokens=response.usage.prompt_tokens, completion_tokens=response.usage.completion_tokens,
                        cached_tokens=response.usage.cached_prompt_tokens, logprobs=logprobs)
                    last = outputs[-1] if outputs else None
                    if response.finish_reason == common_pb2.FINISH_REASON_STOP and last is not None \
                            and (last in request.stop_token_ids or last in self._eos_ids()):
                        complete.matched_token_id = last
                    yield trtllm.GenerateResponse(request_id=response.request_id, complete=complete)
        except Rejected as rejected:
            await context.abort(rejected.code, rejected.message)

    def _eos_ids(self) -> list[int]:
        info = self.generation.scheduler.model_info
        return list(info.eos_token_ids) if info is not None else []

    async def Abort(self, request: trtllm.AbortRequest, context: grpc.aio.ServicerContext) -> trtllm.AbortResponse:
        reply = await self.generation.Abort(generation_pb2.AbortRequest(request_id=request.request_id), context)
        return trtllm.AbortResponse(success=reply.found, message="" if reply.found else "no such request in flight")

    async def HealthCheck(self, request: trtllm.HealthCheckRequest,
                          context: grpc.aio.ServicerContext) -> trtllm.HealthCheckResponse:
        ready = self.generation.scheduler.model_info is not None and not self.generation.draining
        return trtllm.HealthCheckResponse(status="OK" if ready else "NOT_SERVING: the model is not ready")

    async def GetModelInfo(self, request: trtllm.GetModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> trtllm.GetModelInfoResponse:
        info = self.generation.scheduler.model_info
        if info is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is not ready yet")
        return trtllm.GetModelInfoResponse(model_id=info.model_name, max_input_len=info.max_model_len - 1,
                                           max_seq_len=info.max_model_len, vocab_size=info.vocab_size)

    async def GetServerInfo(self, request: trtllm.GetServerInfoRequest,
                            context: grpc.aio.ServicerContext) -> trtllm.GetServerInfoResponse:
        info = self.generation.scheduler.model_info
        tp = info.tp_size if info is not None else 0
        return trtllm.GetServerInfoResponse(version="inflight 0.1.0", backend="pytorch", tensor_parallel_size=tp,
                                            pipeline_parallel_size=1, context_parallel_size=1, world_size=tp)

    async def GetTokenizer(self, request: smg_common.GetTokenizerRequest,
                           context: grpc.aio.ServicerContext) -> AsyncIterator[smg_common.GetTokenizerChunk]:
        if not self._tokenizer:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this server was started without a tokenizer folder")
        digest = hashlib.sha256(self._tokenizer).hexdigest()
        for start in range(0, len(self._tokenizer), TOKENIZER_CHUNK):
            end = start + TOKENIZER_CHUNK
            yield smg_common.GetTokenizerChunk(data=self._tokenizer[start:end],
                                               sha256=digest if end >= len(self._tokenizer) else "")

    async def SubscribeKvEvents(self, request: smg_common.SubscribeKvEventsRequest,
                                context: grpc.aio.ServicerContext) -> AsyncIterator[smg_common.KvEventBatch]:
        await context.send_initial_metadata(())  # routers drop a worker whose subscription does not answer at once
        relay = scheduler_pb2.SubscribeKvEventsRequest(start_sequence_number=request.start_sequence_number)
        call = self.generation.scheduler.stub.SubscribeKvEvents(relay)
        stopping = asyncio.ensure_future(self.generation.stopping.wait())
        sample = 0
        try:
            while True:
                read = asyncio.ensure_future(call.read())
                await asyncio.wait({read, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not read.done():
                    read.cancel()
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "this server is shutting down; resubscribe")
                batch = read.result()
                if batch is grpc.aio.EOF:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "the scheduler's event stream ended; resubscribe")
                sample += 1
                yield to_kv_event_batch(batch, sample)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.OUT_OF_RANGE:
                await context.abort(grpc.StatusCode.OUT_OF_RANGE, error.details() or "the cursor has expired")
            # A scheduler that restarted numbers its batches afresh (from a KvCacheCleared): resubscribe.
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the scheduler's event stream ended ({error.code().name}); "
                                                             "resubscribe")
        finally:
            stopping.cancel()
            call.cancel()
