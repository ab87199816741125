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
from jinja2.exceptions import TemplateError

from inflight.v1 import common_pb2, generation_pb2, generation_pb2_grpc, scheduler_pb2
from services.gateway import validation
from services.gateway.auth import Authenticator
from services.gateway.metrics import GatewayMetrics
from services.gateway.scheduler_client import SchedulerClient, SchedulerError
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


# Statuses whose scheduler text is about the client's own request (safe and useful to show); any
# other failure is reported with a generic message and the request id, its details only logged.
_CLIENT_FACING = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                            grpc.StatusCode.ALREADY_EXISTS})


def scheduler_failure(error: SchedulerError, request_id: str) -> Rejected:
    code = error.code
    if code in _CLIENT_FACING:
        return Rejected(code, error.details or code.name)
    log.error("scheduler_call_failed", code=code.name, details=error.details)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
        return Rejected(code, f"request {request_id} was interrupted: the model backend was unavailable; "
                              "it is safe to retry")
    return Rejected(grpc.StatusCode.INTERNAL,
                    f"internal error while generating request {request_id}; the details are in the server logs")


@dataclass(frozen=True)
class AdmissionLimits:
    """What one gateway takes on at once; past these it answers RESOURCE_EXHAUSTED before any other work."""

    max_inflight_requests: int = 1152  # what the scheduler holds by default: a batch of 128 and 1024 waiting
    max_inflight_per_client: int = 64
    max_messages: int = validation.MAX_MESSAGES


class GenerationService(generation_pb2_grpc.GenerationServicer):
    def __init__(self, codec: TextCodec, scheduler: SchedulerClient, metrics: GatewayMetrics,
                 authenticator: Authenticator | None = None, limits: AdmissionLimits | None = None,
                 trust_message_special_tokens: bool = False) -> None:
        self.codec = codec
        self.scheduler = scheduler
        self.metrics = metrics
        self.authenticator = authenticator
        self.limits = limits or AdmissionLimits()
        self.trust_message_special_tokens = trust_message_special_tokens
        self.in_flight: set[tuple[str, str]] = set()  # (tenant, request id): ids are scoped by tenant
        self.draining = False
        self.stopping = asyncio.Event()  # set once in-flight generations are done: long-lived streams end then
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
                              caller: Caller, prompt_ids: list[int] | None) -> scheduler_pb2.SubmitRequest:
        info = self.scheduler.model_info
        if info is None:
            raise Rejected(grpc.StatusCode.UNAVAILABLE, "the model is not ready yet")
        try:
            if prompt_ids is None:
                prompt_ids = await self._encode(request.prompt, request.messages, check=request)
            else:
                validation.check_sampling(request)
                validation.check_token_ids(prompt_ids, info.vocab_size)
            limits = validation.ValidLimits(info.max_model_len, info.vocab_size)
            max_new_tokens = validation.max_new_tokens(request, len(prompt_ids), limits)
        except validation.InvalidField as error:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from error
        return scheduler_pb2.SubmitRequest(
            request_id=request_id, prompt_token_ids=prompt_ids, max_new_tokens=max_new_tokens,
            sampling=validation.sampling_params(request), stop_token_ids=request.stop_token_ids,
            ignore_eos=request.ignore_eos, priority=request.priority, tenant=caller.tenant,
            cache_salt=request.cache_salt, logprobs=request.logprobs or request.top_logprobs > 0,
        )

    async def _encode(self, prompt: str, messages, check: generation_pb2.GenerateRequest | None = None) -> list[int]:  # type: ignore[no-untyped-def]
        probe = check or generation_pb2.GenerateRequest(prompt=prompt, messages=messages)
        chat = validation.check_request(probe, self.limits.max_messages)
        if chat and not self.codec.has_chat_template:
            raise validation.InvalidField("messages", "this model has no chat template; send prompt")
        if not chat:
            return await asyncio.to_thread(self.codec.encode, prompt)
        try:
            return await asyncio.to_thread(self.codec.encode_chat, chat, self.trust_message_special_tokens)
        except (TemplateError, ValueError) as error:  # the model's template refused these turns
            raise validation.InvalidField("messages", str(error)) from error

    def _admit_caller(self, caller: Caller, request_id: str) -> None:
        """The admission decision, made before any costly work (tokenizing, templating, the scheduler)."""
        if self.draining:
            raise Rejected(grpc.StatusCode.UNAVAILABLE, "the gateway is shutting down")
        # with other gateway processes on the same scheduler, what it holds for them counts against the bound too
        if len(self.in_flight) + self.scheduler.held_elsewhere() >= self.limits.max_inflight_requests:
            raise Rejected(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"the server is at its limit of {self.limits.max_inflight_requests} requests in flight; "
                           "retry later")
        if self._per_client[caller.client_key] >= self.limits.max_inflight_per_client:
            raise Rejected(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"this client already has {self.limits.max_inflight_per_client} requests in flight")
        if (caller.tenant, request_id) in self.in_flight:
            raise Rejected(grpc.StatusCode.ALREADY_EXISTS, f"request_id: {request_id!r} is already in flight")
        self._per_client[caller.client_key] += 1
        self.in_flight.add((caller.tenant, request_id))
        self.metrics.in_flight.inc()

    def _release_caller(self, caller: Caller, request_id: str) -> None:
        self._per_client[caller.client_key] -= 1
        if not self._per_client[caller.client_key]:
            del self._per_client[caller.client_key]
        self.in_flight.discard((caller.tenant, request_id))
        self.metrics.in_flight.dec()

    async def stream(self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext,
                     prompt_ids: list[int] | None = None) -> AsyncIterator[generation_pb2.GenerateResponse]:
        """The generation as a stream of responses; raises Rejected for a gRPC error status.

        prompt_ids: the prompt already tokenized (protocols whose router tokenizes); request then
        carries only the sampling and stopping fields.
        """
        caller = self._caller(context)
        request_id = request.request_id or uuid.uuid4().hex
        progress = Progress()
        self._admit_caller(caller, request_id)
        structlog.contextvars.bind_contextvars(request_id=request_id)
        finish_reason = common_pb2.FINISH_REASON_UNSPECIFIED
        submitted = False
        try:
            submit = await self._submit_request(request, request_id, caller, prompt_ids)
            progress.usage.prompt_tokens = len(submit.prompt_token_ids)
            self.metrics.prompt_tokens.inc(len(submit.prompt_token_ids))
            log.info("request_received", prompt_tokens=len(submit.prompt_token_ids),
                     max_new_tokens=submit.max_new_tokens, tenant=caller.tenant)
            detokenizer = IncrementalDetokenizer(self.codec.tokenizer)
            stops = StopStringMatcher(list(request.stop))
            submitted = True
            # Closed on the way out (stop string hit, or our client went away): the scheduler aborts the request.
            async with contextlib.aclosing(self.scheduler.generate(submit, context.time_remaining())) as events:
                async for event in events:
                    response, finish_reason = self._on_event(event, progress, detokenizer, stops, request_id)
                    yield response
                    if finish_reason:
                        break
        except SchedulerError as error:
            raise scheduler_failure(error, request_id) from error
        finally:
            self._release_caller(caller, request_id)
            if submitted:
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

    async def Generate(self, request: generation_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[generation_pb2.GenerateResponse]:
        try:
            async for response in self.stream(request, context):
                yield response
        except Rejected as rejected:  # the metrics interceptor counts the status
            await context.abort(rejected.code, rejected.message)

    async def Complete(self, request: generation_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> generation_pb2.CompleteResponse:
        result = generation_pb2.CompleteResponse()
        try:
            async for response in self.stream(request, context):
                result.text += response.text
                result.token_ids.extend(response.token_ids)
                result.logprobs.extend(response.logprobs)
                result.request_id = response.request_id
                if response.finish_reason:
                    result.finish_reason = response.finish_reason
                    result.usage.CopyFrom(response.usage)
                    result.timings.CopyFrom(response.timings)
        except Rejected as rejected:
            await context.abort(rejected.code, rejected.message)
        return result

    async def Abort(self, request: generation_pb2.AbortRequest, context: grpc.aio.ServicerContext) -> generation_pb2.AbortResponse:
        caller = self._caller(context)
        if not request.request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id: must not be empty")
        if (caller.tenant, request.request_id) not in self.in_flight:
            return generation_pb2.AbortResponse(found=False)  # unknown, finished, or another tenant's
        abort = scheduler_pb2.SchedulerAbortRequest(request_id=request.request_id, tenant=caller.tenant)
        try:
            reply = await self.scheduler.stub.Abort(abort, timeout=10)
        except grpc.aio.AioRpcError as error:
            log.warning("scheduler_abort_failed", code=error.code().name, details=error.details())
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model backend is unavailable; retry")
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
