"""inflight.v1.Generation: text in, streamed text out; plus Complete, Abort, ModelInfo, Tokenize."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import structlog

from inflight.v1 import common_pb2, generation_pb2, generation_pb2_grpc, scheduler_pb2
from services.gateway import validation
from services.gateway.auth import Authenticator
from services.gateway.metrics import GatewayMetrics
from services.gateway.scheduler_client import SchedulerClient
from services.text.codec import TextCodec
from services.text.detokenizer import IncrementalDetokenizer
from services.text.stop_strings import StopStringMatcher

log = structlog.get_logger()
TENANT_METADATA_KEY = "x-tenant-id"


@dataclass
class Caller:
    tenant: str
    client_key: str  # what per-client limits count by: the tenant, else the peer's address


@dataclass
class Progress:
    """What the gateway knows of one generation as it streams."""

    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    last_token_at: float | None = None
    usage: generation_pb2.Usage = field(default_factory=generation_pb2.Usage)
    queue_seconds: float = 0.0

    def timings(self) -> generation_pb2.Timings:
        end = time.perf_counter()
        ttft = (self.first_token_at or end) - self.started
        return generation_pb2.Timings(queue_seconds=self.queue_seconds, time_to_first_token_seconds=ttft,
                                      total_seconds=end - self.started)


class Rejected(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class GenerationService(generation_pb2_grpc.GenerationServicer):
    def __init__(self, codec: TextCodec, scheduler: SchedulerClient, metrics: GatewayMetrics,
                 authenticator: Authenticator | None = None, max_inflight_per_client: int = 64) -> None:
        self.codec = codec
        self.scheduler = scheduler
        self.metrics = metrics
        self.authenticator = authenticator
        self.max_inflight_per_client = max_inflight_per_client
        self.in_flight: dict[str, str] = {}  # request id -> tenant
        self.draining = False
        self._per_client: Counter[str] = Counter()

    # --- who is calling ----------------------------------------------------------------

    def _caller(self, context: grpc.aio.ServicerContext) -> Caller:
        metadata = context.invocation_metadata() or ()
        principal = self.authenticator.principal(metadata) if self.authenticator else None
        if principal is not None:
            return Caller(principal.tenant, f"tenant:{principal.tenant}")
        tenant = next((v for k, v in metadata if k == TENANT_METADATA_KEY and isinstance(v, str)), "")
        peer = context.peer() or ""
        return Caller(tenant, f"tenant:{tenant}" if tenant else peer.rsplit(":", 1)[0])

    # --- the generation itself ---------------------------------------------------------

    async def _submit_request(self, request: generation_pb2.GenerateRequest, request_id: str,
                              caller: Caller) -> scheduler_pb2.SubmitRequest:
        info = self.scheduler.model_info
        if info is None or self.draining:
            raise Rejected(grpc.StatusCode.UNAVAILABLE, "the gateway is shutting down" if self.draining
                           else "the model is not ready yet")
        try:
            prompt_ids = await self._encode(request.prompt, request.messages, check=request)
            limits = validation.ValidLimits(info.max_model_len, info.vocab_size)
            max_new_tokens = validation.max_new_tokens(request, len(prompt_ids), limits)
        except validation.InvalidField as error:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from error
        return scheduler_pb2.SubmitRequest(
            request_id=request_id, prompt_token_ids=prompt_ids, max_new_tokens=max_new_tokens,
            sampling=validation.sampling_params(request), stop_token_ids=request.stop_token_ids,
            ignore_eos=request.ignore_eos, priority=request.priority, tenant=caller.tenant,
            logprobs=request.logprobs or request.top_logprobs > 0,
        )

    async def _encode(self, prompt: str, messages, check: generation_pb2.GenerateRequest | None = None) -> list[int]:  # type: ignore[no-untyped-def]
        probe = check or generation_pb2.GenerateRequest(prompt=prompt, messages=messages)
        chat = validation.check_request(probe)
        if chat and not self.codec.has_chat_template:
            raise validation.InvalidField("messages", "this model has no chat template; send prompt")
        if chat:
            return await asyncio.to_thread(self.codec.encode_chat, chat)
        return await asyncio.to_thread(self.codec.encode, prompt)

    def _admit_caller(self, caller: Caller, request_id: str) -> None:
        if self._per_client[caller.client_key] >= self.max_inflight_per_client:
            raise Rejected(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"this client already has {self.max_inflight_per_client} requests in flight")
        if request_id in self.in_flight:
            raise Rejected(grpc.StatusCode.ALREADY_EXISTS, f"request_id: {request_id!r} is already in flight")
        self._per_client[caller.client_key] += 1
        self.in_flight[request_id] = caller.tenant
        self.metrics.in_flight.inc()

    def _release_caller(self, caller: Caller, request_id: str) -> None:
        self._per_client[caller.client_key] -= 1
        if not self._per_client[caller.client_key]:
            del self._per_client[caller.client_key]
        self.in_flight.pop(request_id, None)
        self.metrics.in_flight.dec()

    async def _stream(self, request: generation_pb2.GenerateRequest,
                      context: grpc.aio.ServicerContext) -> AsyncIterator[generation_pb2.GenerateResponse]:
        """The generation as a stream of responses; raises Rejected for a gRPC error status."""
        caller = self._caller(context)
        request_id = request.request_id or uuid.uuid4().hex
        progress = Progress()
        submit = await self._submit_request(request, request_id, caller)
        self._admit_caller(caller, request_id)
        structlog.contextvars.bind_contextvars(request_id=request_id)
        progress.usage.prompt_tokens = len(submit.prompt_token_ids)
        self.metrics.prompt_tokens.inc(len(submit.prompt_token_ids))
        log.info("request_received", prompt_tokens=len(submit.prompt_token_ids), max_new_tokens=submit.max_new_tokens,
                 tenant=caller.tenant)
        call = self.scheduler.stub.Submit(submit, timeout=context.time_remaining())
        finish_reason = common_pb2.FINISH_REASON_UNSPECIFIED
        try:
            detokenizer = IncrementalDetokenizer(self.codec.tokenizer)
            stops = StopStringMatcher(list(request.stop))
            async for event in call:
                response, finish_reason = self._on_event(event, progress, detokenizer, stops, request_id)
                yield response
                if finish_reason:
                    break
        except grpc.aio.AioRpcError as error:
            raise Rejected(error.code(), error.details() or "the scheduler failed") from error
        finally:
            if not call.done():
                call.cancel()  # stop string hit, or our client went away: the scheduler aborts
            self._release_caller(caller, request_id)
            self._record(progress, finish_reason)
            structlog.contextvars.unbind_contextvars("request_id")

    def _on_event(self, event: scheduler_pb2.TokenEvent, progress: Progress, detokenizer: IncrementalDetokenizer,
                  stops: StopStringMatcher, request_id: str) -> tuple[generation_pb2.GenerateResponse, int]:
        now = time.perf_counter()
        progress.first_token_at = progress.first_token_at or now
        progress.last_token_at = now
        progress.usage.completion_tokens += len(event.token_ids)
        if event.num_cached_prompt_tokens:
            progress.usage.cached_prompt_tokens = event.num_cached_prompt_tokens
        if event.queue_seconds:
            progress.queue_seconds = event.queue_seconds
        text, stopped = stops.push(detokenizer.push(list(event.token_ids)))
        finish_reason = common_pb2.FINISH_REASON_STOP if stopped else event.finish_reason
        if finish_reason and not stopped:
            text += stops.push(detokenizer.flush())[0] + stops.flush()
        response = generation_pb2.GenerateResponse(text=text, token_ids=event.token_ids, request_id=request_id,
                                                   logprobs=event.logprobs)
        if finish_reason:
            response.finish_reason = finish_reason
            response.usage.CopyFrom(progress.usage)
            response.timings.CopyFrom(progress.timings())
        return response, finish_reason

    def _record(self, progress: Progress, finish_reason: int) -> None:
        m, usage = self.metrics, progress.usage
        m.generated_tokens.inc(usage.completion_tokens)
        m.cached_prompt_tokens.inc(usage.cached_prompt_tokens)
        m.finish_reasons.labels(common_pb2.FinishReason.Name(finish_reason).removeprefix("FINISH_REASON_")).inc()
        if progress.first_token_at is not None:
            m.ttft.observe(progress.first_token_at - progress.started)
            m.queue_time.observe(progress.queue_seconds)
            m.e2e.observe(time.perf_counter() - progress.started)
            if usage.completion_tokens > 1 and progress.last_token_at is not None:
                m.tpot.observe((progress.last_token_at - progress.first_token_at) / (usage.completion_tokens - 1))
        log.info("request_done", finish_reason=common_pb2.FinishReason.Name(finish_reason),
                 completion_tokens=usage.completion_tokens, cached_prompt_tokens=usage.cached_prompt_tokens,
                 ttft_ms=round(1000 * (progress.first_token_at - progress.started), 1) if progress.first_token_at else None,
                 total_ms=round(1000 * (time.perf_counter() - progress.started), 1))

    # --- RPCs ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _counted(self, rpc: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """Ends a Rejected call with its status, and counts every call by its final status code."""
        code = grpc.StatusCode.OK
        try:
            yield
        except Rejected as rejected:
            code = rejected.code
            await context.abort(rejected.code, rejected.message)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            self.metrics.requests.labels(rpc, code.name).inc()

    async def Generate(self, request: generation_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[generation_pb2.GenerateResponse]:
        async with self._counted("Generate", context):
            async for response in self._stream(request, context):
                yield response

    async def Complete(self, request: generation_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> generation_pb2.CompleteResponse:
        result = generation_pb2.CompleteResponse()
        async with self._counted("Complete", context):
            async for response in self._stream(request, context):
                result.text += response.text
                result.token_ids.extend(response.token_ids)
                result.logprobs.extend(response.logprobs)
                result.request_id = response.request_id
                if response.finish_reason:
                    result.finish_reason = response.finish_reason
                    result.usage.CopyFrom(response.usage)
                    result.timings.CopyFrom(response.timings)
        return result

    async def Abort(self, request: generation_pb2.AbortRequest, context: grpc.aio.ServicerContext) -> generation_pb2.AbortResponse:
        caller = self._caller(context)
        if not request.request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id: must not be empty")
        if self.in_flight.get(request.request_id) != caller.tenant:
            return generation_pb2.AbortResponse(found=False)  # unknown, finished, or another tenant's
        try:
            reply = await self.scheduler.stub.Abort(scheduler_pb2.SchedulerAbortRequest(request_id=request.request_id),
                                                    timeout=10)
        except grpc.aio.AioRpcError as error:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the scheduler is unreachable: {error.code().name}")
        return generation_pb2.AbortResponse(found=reply.found)

    async def ModelInfo(self, request: generation_pb2.ModelInfoRequest,
                        context: grpc.aio.ServicerContext) -> generation_pb2.ModelInfoResponse:
        info = self.scheduler.model_info
        if info is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is not ready yet")
        return generation_pb2.ModelInfoResponse(
            model_name=info.model_name, context_length=info.max_model_len, vocab_size=info.vocab_size,
            eos_token_ids=info.eos_token_ids, tp_size=info.tp_size, engine=info.engine, device=info.device,
            has_chat_template=self.codec.has_chat_template,
        )

    async def Tokenize(self, request: generation_pb2.TokenizeRequest,
                       context: grpc.aio.ServicerContext) -> generation_pb2.TokenizeResponse:
        try:
            ids = await self._encode(request.prompt, request.messages)
        except validation.InvalidField as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        tokens = [self.codec.tokenizer.id_to_token(i) or "" for i in ids]
        return generation_pb2.TokenizeResponse(token_ids=ids, tokens=tokens)

    async def Detokenize(self, request: generation_pb2.DetokenizeRequest,
                         context: grpc.aio.ServicerContext) -> generation_pb2.DetokenizeResponse:
        vocab = self.codec.vocab_size
        bad = next((i for i, t in enumerate(request.token_ids) if t >= vocab), None)
        if bad is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"token_ids[{bad}]: {request.token_ids[bad]} is outside the vocabulary ({vocab})")
        return generation_pb2.DetokenizeResponse(text=self.codec.decode(list(request.token_ids)))
