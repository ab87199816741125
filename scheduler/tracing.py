"""What the scheduler adds to a trace: each request's lifecycle, and each step.

A request's Submit call already has a server span (the gRPC interceptor starts it, continuing the
gateway's trace). The engine loop runs in its own task, where that span is not current, so the span
travels on the Request and the loop adds the lifecycle to it as events: `queued`, `first_scheduled`,
`first_token`, `finished` (and `rescheduled` after a preemption). A step serves many requests from
many traces, so it is a root span of its own, `scheduler.step`, linked to the Submit spans of the
requests it carried.

Imported only when tracing is on (it needs opentelemetry); the loop holds None otherwise.
"""

from __future__ import annotations


import grpc
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, Status, StatusCode, Tracer

from inflight.v1 import common_pb2, worker_pb2
from scheduler.planned_step import PlannedStep
from scheduler.request import Request

STEP_SPAN = "scheduler.step"
MAX_LINKS_PER_STEP = 64  # a step of hundreds of sequences links the first ones; the count says how many ran


class SchedulerTracing:
    """The engine loop's hooks into tracing: lifecycle events on request spans, and step spans."""

    def __init__(self, tracer: Tracer) -> None:
        self.tracer = tracer

    # --- a request's lifecycle, as events on its Submit span ----------------------------------

    @staticmethod
    def queued(request: Request) -> None:
        """Called in the Submit handler: the request takes the current span (its call's), if recorded."""
        span = trace.get_current_span()
        if not span.is_recording():
            return
        request.span = span
        span.add_event("queued", {"inflight.request_id": request.request_id,
                                  "inflight.prompt_tokens": len(request.prompt_token_ids),
                                  "inflight.max_new_tokens": request.max_new_tokens})

    @staticmethod
    def scheduled(step: PlannedStep) -> None:
        """`first_scheduled` for requests admitted by this step for the first time, `rescheduled` after a preemption."""
        for request in step.admitted:
            if request.span is None:
                continue
            if request.num_preemptions:
                request.span.add_event("rescheduled", {"inflight.step_id": step.step_id,
                                                       "inflight.preemptions": request.num_preemptions})
            else:
                request.span.add_event("first_scheduled", {
                    "inflight.step_id": step.step_id,
                    "inflight.queue_seconds": max(0.0, request.first_scheduled_at - request.arrived_at),
                    "inflight.cached_prompt_tokens": request.num_cached_prompt_tokens})

    @staticmethod
    def first_token(request: Request) -> None:
        if request.span is not None:
            request.span.add_event("first_token")

    @staticmethod
    def finished(request: Request, reason: int, failure: grpc.StatusCode | None = None) -> None:
        """reason: the FinishReason it ended with (ABORT for a failure, whose status is `failure`)."""
        span = request.span
        if span is None:
            return
        attributes = {"inflight.finish_reason": common_pb2.FinishReason.Name(reason).removeprefix("FINISH_REASON_"),
                      "inflight.prompt_tokens": len(request.prompt_token_ids),
                      "inflight.completion_tokens": len(request.output_token_ids),
                      "inflight.preemptions": request.num_preemptions}
        if failure is not None:
            attributes["inflight.failure"] = failure.name
        span.add_event("finished", attributes)
        request.span = None  # nothing more happens to it

    # --- steps, as root spans linked to their requests -----------------------------------------

    def step(self, step: PlannedStep) -> Span:
        """A span from sending a step to its result (steps overlap, so it is never the current span);
        step_done ends it."""
        decodes = sum(1 for request, start in zip(step.requests, step.num_computed_tokens)
                      if start >= request.num_prompt_tokens)  # only generated tokens to process
        attributes = {"inflight.step_id": step.step_id, "inflight.sequences": len(step.requests),
                      "inflight.tokens": step.total_tokens, "inflight.decode_sequences": decodes,
                      "inflight.prefill_sequences": len(step.requests) - decodes}
        return self.tracer.start_span(STEP_SPAN, context=Context(), links=_links(step), attributes=attributes)

    @staticmethod
    def step_done(span: Span, result: worker_pb2.StepResult | None, error: str = "") -> None:
        """End a step's span with its result, or with the error that lost it (result None)."""
        if result is not None:
            span.set_attribute("inflight.sampled_tokens", len(result.sampled.slot_ids))
            span.set_attribute("inflight.forward_seconds", result.forward_seconds)
            if result.sequence_errors:
                span.set_attribute("inflight.sequence_errors", len(result.sequence_errors))
            error = result.error
        if error:
            span.set_status(Status(StatusCode.ERROR, error))
        span.end()


def _links(step: PlannedStep) -> list[Link]:
    links = []
    for request in step.requests:
        span = request.span
        if span is not None:
            links.append(Link(span.get_span_context(), {"inflight.request_id": request.request_id}))
            if len(links) == MAX_LINKS_PER_STEP:
                break
    return links

