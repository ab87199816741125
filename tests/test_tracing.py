"""OpenTelemetry tracing: off by default; with --otlp-traces-endpoint one Generate is one trace across
gateway and scheduler, continuing the caller's `traceparent`, with the request's lifecycle as events and
each step a span linked to its requests. Bad input gets the same answers as without tracing."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode, Tracer

from inflight import sampling
from inflight.tracing import TRACING_OFF, start_tracing
from inflight.v1 import generation_pb2, worker_pb2
from scheduler.engine_loop import Failure
from scheduler.planned_step import PlannedStep
from scheduler.request import Request
from scheduler.tracing import MAX_LINKS_PER_STEP, SchedulerTracing
from tests.conftest import STACK_ARGS
from tests.otlp_collector import ExportedSpan, OtlpCollector
from tests.stack import REPO, ServedStack
from tests.test_engine_loop import Harness, outcome, run_with

GENERATE = "/inflight.v1.Generation/Generate"
SUBMIT = "/inflight.v1.Scheduler/Submit"
SERVER, CLIENT = 2, 3  # opentelemetry.proto's Span.SpanKind values
LIFECYCLE = ["queued", "first_scheduled", "first_token", "finished"]


def short_request(max_tokens: int = 3) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(prompt="The lighthouse keeper", max_tokens=max_tokens, ignore_eos=True)


def caller_span() -> tuple[str, str, str]:
    """A W3C traceparent of a sampled span the test owns, with its trace id and span id."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def in_trace(spans: list[ExportedSpan], trace_id: str) -> list[ExportedSpan]:
    return [s for s in spans if s.span.trace_id.hex() == trace_id]


def one(spans: list[ExportedSpan], service: str, name: str, kind: int) -> ExportedSpan:
    found = [s for s in spans if s.service == service and s.span.name == name and s.span.kind == kind]
    assert len(found) == 1, f"{service} {name}: {len(found)} spans"
    return found[0]


def attributes(item: object) -> dict[str, object]:
    return {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in item.attributes}  # type: ignore[attr-defined]


# --- off by default ------------------------------------------------------------------------------------------


def test_without_an_endpoint_tracing_is_off_and_opentelemetry_is_never_imported() -> None:
    assert start_tracing("inflight-gateway", "") is TRACING_OFF
    assert not TRACING_OFF.server_interceptors and not TRACING_OFF.client_interceptors and not TRACING_OFF.enabled
    check = ("import sys, services.gateway.__main__, scheduler.__main__, services.launcher\n"
             "from inflight.tracing import start_tracing\n"
             "start_tracing('inflight-scheduler', '')\n"
             "loaded = [m for m in sys.modules if m.startswith('opentelemetry')]\n"
             "assert not loaded, loaded\n")
    env = {k: v for k, v in os.environ.items() if k != "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"}
    subprocess.run([sys.executable, "-c", check], cwd=REPO, env=env, check=True, timeout=120)


def test_the_flag_without_opentelemetry_installed_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.grpc.trace_exporter", None)
    with pytest.raises(SystemExit, match=r"pip install 'inflight\[otel\]'"):
        start_tracing("inflight-gateway", "http://127.0.0.1:4317")


# --- a traced stack ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def collector() -> Iterator[OtlpCollector]:
    running = OtlpCollector()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def traced_stack(collector: OtlpCollector) -> Iterator[ServedStack]:
    # Export every 200 ms instead of every 5 s, so that the spans arrive while the test waits.
    served = ServedStack(*STACK_ARGS, "--otlp-traces-endpoint", collector.endpoint,
                         env={"OTEL_BSP_SCHEDULE_DELAY": "200"}).wait_ready()
    yield served
    assert served.stop() == 0, served.log_tail()


@pytest.mark.slow
def test_one_generate_is_one_trace_across_gateway_and_scheduler_continuing_the_callers(
        traced_stack: ServedStack, collector: OtlpCollector) -> None:
    traceparent, trace_id, parent_id = caller_span()
    responses = list(traced_stack.client.generation.Generate(short_request(), timeout=60,
                                                              metadata=[("traceparent", traceparent)]))
    assert responses[-1].usage.completion_tokens == 3

    def complete(spans: list[ExportedSpan]) -> bool:
        mine = in_trace(spans, trace_id)
        submits = [s for s in mine if s.service == "inflight-scheduler" and s.span.name == SUBMIT]
        return (any(s.service == "inflight-gateway" and s.span.name == GENERATE for s in mine) and bool(submits)
                and any(s.service == "inflight-gateway" and s.span.name == SUBMIT for s in mine)
                and any(s.span.name == "scheduler.step" and any(link.span_id == submits[0].span.span_id
                                                                 for link in s.span.links) for s in spans))

    spans = collector.wait_for(complete)
    mine = in_trace(spans, trace_id)
    generate = one(mine, "inflight-gateway", GENERATE, SERVER)
    submit_call = one(mine, "inflight-gateway", SUBMIT, CLIENT)
    submit = one(mine, "inflight-scheduler", SUBMIT, SERVER)
    assert generate.span.parent_span_id.hex() == parent_id  # the caller's span is the gateway's parent
    assert submit_call.span.parent_span_id == generate.span.span_id
    assert submit.span.parent_span_id == submit_call.span.span_id

    events = {event.name: event for event in submit.span.events}
    assert [event.name for event in submit.span.events] == LIFECYCLE
    assert attributes(events["finished"])["inflight.finish_reason"] == "LENGTH"
    assert attributes(events["finished"])["inflight.completion_tokens"] == 3
    assert attributes(events["queued"])["inflight.prompt_tokens"] == responses[-1].usage.prompt_tokens

    steps = [s for s in spans if s.span.name == "scheduler.step"
             and any(link.span_id == submit.span.span_id and link.trace_id == submit.span.trace_id
                     for link in s.span.links)]
    assert len(steps) == 3  # the prompt (sampling the first token), then one decode per further token
    assert all(s.service == "inflight-scheduler" and not s.span.parent_span_id for s in steps)  # roots of their own
    assert all(s.span.trace_id != submit.span.trace_id for s in steps)
    first = min(steps, key=lambda s: s.span.start_time_unix_nano)
    assert attributes(first.span)["inflight.prefill_sequences"] >= 1
    assert attributes(first.span)["inflight.tokens"] >= responses[-1].usage.prompt_tokens


@pytest.mark.slow
def test_health_checks_are_not_traced(traced_stack: ServedStack, collector: OtlpCollector) -> None:
    traceparent, trace_id, _ = caller_span()
    list(traced_stack.client.generation.Generate(short_request(1), timeout=60, metadata=[("traceparent", traceparent)]))
    spans = collector.wait_for(lambda spans: any(s.span.name == GENERATE for s in in_trace(spans, trace_id)))
    assert not [s for s in spans if "grpc.health" in s.span.name or "GetStats" in s.span.name]


@pytest.mark.slow
@pytest.mark.parametrize("traceparent", [
    "garbage",
    "00-" + "0" * 32 + "-" + "1" * 16 + "-01",  # the all-zero trace id is invalid
    "ff-" + "a" * 32 + "-" + "b" * 16 + "-01",  # version ff is forbidden
    "00-" + "a" * 32 + "-" + "b" * 16 + "-01-" + "x" * 4000,
])
def test_a_malformed_traceparent_still_generates(traced_stack: ServedStack, traceparent: str) -> None:
    responses = list(traced_stack.client.generation.Generate(short_request(2), timeout=60,
                                                              metadata=[("traceparent", traceparent)]))
    assert responses[-1].usage.completion_tokens == 2
    assert responses[-1].finish_reason


@pytest.mark.slow
def test_bad_requests_keep_their_status_codes_when_traced(traced_stack: ServedStack, collector: OtlpCollector) -> None:
    traceparent, trace_id, _ = caller_span()
    with pytest.raises(grpc.RpcError) as invalid:
        list(traced_stack.client.generation.Generate(generation_pb2.GenerateRequest(prompt="x", temperature=-1),
                                                     timeout=30, metadata=[("traceparent", traceparent)]))
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with grpc.insecure_channel(traced_stack.address) as channel:
        raw = channel.unary_stream(GENERATE)
        with pytest.raises(grpc.RpcError) as malformed:
            list(raw(b"\xff\xfe", timeout=30))
    assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    spans = collector.wait_for(lambda spans: any(s.span.name == GENERATE for s in in_trace(spans, trace_id)))
    generate = one(in_trace(spans, trace_id), "inflight-gateway", GENERATE, SERVER)
    assert attributes(generate.span)["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    stats = traced_stack.wait_idle()
    assert stats.kv_blocks_free == stats.kv_blocks_total


@pytest.mark.slow
def test_a_client_hanging_up_ends_the_requests_spans_with_an_abort(traced_stack: ServedStack,
                                                                    collector: OtlpCollector) -> None:
    traceparent, trace_id, _ = caller_span()
    stream = traced_stack.client.generation.Generate(short_request(200), timeout=60, metadata=[("traceparent", traceparent)])
    next(stream), next(stream)
    stream.cancel()
    stats = traced_stack.wait_idle()
    assert stats.kv_blocks_free == stats.kv_blocks_total

    def ended(spans: list[ExportedSpan]) -> bool:
        names = {(s.service, s.span.name) for s in in_trace(spans, trace_id)}
        return names >= {("inflight-gateway", GENERATE), ("inflight-gateway", SUBMIT), ("inflight-scheduler", SUBMIT)}

    submit = one(in_trace(collector.wait_for(ended), trace_id), "inflight-scheduler", SUBMIT, SERVER)
    finished = [event for event in submit.span.events if event.name == "finished"]
    assert len(finished) == 1 and attributes(finished[0])["inflight.finish_reason"] == "ABORT"


# --- the scheduler's spans, against a scripted worker and the SDK's in-memory exporter ---------------------------


def in_memory_tracing() -> tuple[SchedulerTracing, Tracer, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    return SchedulerTracing(tracer), tracer, exporter


def test_a_failed_step_is_an_error_span_and_its_request_finishes_with_the_failure(tmp_path: Path) -> None:
    tracing, tracer, exporter = in_memory_tracing()

    async def answer(plan, context):  # type: ignore[no-untyped-def]
        return worker_pb2.StepResult(step_id=plan.step_id, error="RuntimeError: out of memory")

    async def body(h: Harness) -> None:
        with tracer.start_as_current_span("Submit"):  # what the server interceptor makes current in the handler
            _, ended = await outcome(h.submit("doomed"))
        assert isinstance(ended, Failure) and ended.code == grpc.StatusCode.INTERNAL

    run_with(answer, body, tmp_path, tracing=tracing)
    submit = next(s for s in exporter.get_finished_spans() if s.name == "Submit")
    step = next(s for s in exporter.get_finished_spans() if s.name == "scheduler.step")
    assert [event.name for event in submit.events] == ["queued", "first_scheduled", "finished"]
    assert submit.events[-1].attributes["inflight.failure"] == "INTERNAL"
    assert step.status.status_code is StatusCode.ERROR and step.parent is None
    assert [link.context.span_id for link in step.links] == [submit.context.span_id]


def test_a_step_links_at_most_64_of_its_requests(tmp_path: Path) -> None:
    tracing, tracer, exporter = in_memory_tracing()
    requests = []
    for number in range(100):
        request = Request(request_id=f"r{number}", prompt_token_ids=[1, 2], max_new_tokens=4,
                          sampling=sampling.resolved(), stop_token_ids=frozenset(), arrival_order=number,
                          span=tracer.start_span(f"Submit {number}"))
        requests.append(request)
    step = PlannedStep(step_id=7, released_slot_ids=[], admitted=[], requests=requests,
                       num_computed_tokens=np.zeros(100, dtype=np.int64), token_ids=np.ones(200, dtype=np.int64))
    tracing.step_done(tracing.step(step), None)
    step = exporter.get_finished_spans()[-1]
    assert len(step.links) == MAX_LINKS_PER_STEP == 64
    assert step.attributes["inflight.sequences"] == 100 and step.attributes["inflight.prefill_sequences"] == 100
