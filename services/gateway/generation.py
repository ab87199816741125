"""inflight.v1.Generation: text in, streamed text out."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import structlog

from inflight.v1 import common_pb2, generation_pb2, generation_pb2_grpc, scheduler_pb2
from services.gateway import validation
from services.gateway.scheduler_client import SchedulerClient
from services.text.codec import TextCodec
from services.text.detokenizer import IncrementalDetokenizer
from services.text.stop_strings import StopStringMatcher

log = structlog.get_logger()


class GenerationService(generation_pb2_grpc.GenerationServicer):
    def __init__(self, codec: TextCodec, scheduler: SchedulerClient) -> None:
        self.codec = codec
        self.scheduler = scheduler

    async def _submit_request(self, request: generation_pb2.GenerateRequest, request_id: str,
                              context: grpc.aio.ServicerContext) -> scheduler_pb2.SubmitRequest:
        info = self.scheduler.model_info
        if info is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is not ready yet")
        try:
            messages = validation.check_request(request)
            if messages and not self.codec.has_chat_template:
                raise validation.InvalidField("messages", "this model has no chat template; send prompt")
            if messages:
                prompt_ids = await asyncio.to_thread(self.codec.encode_chat, messages)
            else:
                prompt_ids = await asyncio.to_thread(self.codec.encode, request.prompt)
            limits = validation.ValidLimits(info.max_model_len, info.vocab_size)
            max_new_tokens = validation.max_new_tokens(request, len(prompt_ids), limits)
        except validation.InvalidField as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        return scheduler_pb2.SubmitRequest(
            request_id=request_id, prompt_token_ids=prompt_ids, max_new_tokens=max_new_tokens,
            sampling=validation.sampling_params(request), stop_token_ids=request.stop_token_ids,
            ignore_eos=request.ignore_eos,
        )

    async def Generate(self, request: generation_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[generation_pb2.GenerateResponse]:
        request_id = request.request_id or uuid.uuid4().hex
        structlog.contextvars.bind_contextvars(request_id=request_id)
        start = time.perf_counter()
        submit = await self._submit_request(request, request_id, context)
        detokenizer = IncrementalDetokenizer(self.codec.tokenizer)
        stops = StopStringMatcher(list(request.stop))
        usage = generation_pb2.Usage(prompt_tokens=len(submit.prompt_token_ids))
        finish_reason = common_pb2.FINISH_REASON_UNSPECIFIED
        call = self.scheduler.stub.Submit(submit, timeout=context.time_remaining())
        log.info("request_received", prompt_tokens=usage.prompt_tokens, max_new_tokens=submit.max_new_tokens)
        first_token_at = None
        try:
            async for event in call:
                first_token_at = first_token_at or time.perf_counter()
                usage.completion_tokens += len(event.token_ids)
                if event.num_cached_prompt_tokens:
                    usage.cached_prompt_tokens = event.num_cached_prompt_tokens
                text, stopped = stops.push(detokenizer.push(list(event.token_ids)))
                finish_reason = common_pb2.FINISH_REASON_STOP if stopped else event.finish_reason
                if finish_reason and not stopped:
                    text += stops.push(detokenizer.flush())[0] + stops.flush()
                response = generation_pb2.GenerateResponse(text=text, token_ids=event.token_ids, request_id=request_id)
                if finish_reason:
                    response.finish_reason = finish_reason
                    response.usage.CopyFrom(usage)
                yield response
                if finish_reason:
                    break
        except grpc.aio.AioRpcError as error:
            await context.abort(error.code(), error.details() or "the scheduler failed")
        finally:
            if not call.done():
                call.cancel()  # stop string hit, or our client went away: the scheduler aborts
            log.info("request_done", finish_reason=common_pb2.FinishReason.Name(finish_reason),
                     completion_tokens=usage.completion_tokens,
                     ttft_ms=round(1000 * (first_token_at - start), 1) if first_token_at else None,
                     total_ms=round(1000 * (time.perf_counter() - start), 1))
            structlog.contextvars.unbind_contextvars("request_id")
