"""Prometheus metrics of the gateway, served on their own HTTP port.

When a stack runs several gateway processes (`inflight serve --gateway-processes N`), the launcher gives each
the same PROMETHEUS_MULTIPROC_DIR: prometheus_client then keeps every process's values in files there, and
the one process that serves the port reports them summed (the in-flight gauge over live processes, the
scheduler's figures as most recently polled).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess

from services.gateway.handlers import replace_behavior

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("inflight_requests", "Finished calls of every RPC the gateway serves, by method and "
                                "final gRPC status code", ["rpc", "code"], registry=r)
        self.finish_reasons = Counter("inflight_finish_reasons", "Finished generations by finish reason",
                                      ["reason"], registry=r)
        self.prompt_tokens = Counter("inflight_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generated_tokens = Counter("inflight_generation_tokens", "Tokens generated", registry=r)
        self.cached_prompt_tokens = Counter("inflight_cached_prompt_tokens", "Prompt tokens served from the prefix cache",
                                            registry=r)
        self.ttft = Histogram("inflight_time_to_first_token_seconds", "Gateway arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("inflight_time_per_output_token_seconds", "Mean time between tokens after the first",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("inflight_queue_time_seconds", "Scheduler arrival to first scheduled step",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("inflight_request_duration_seconds", "Gateway arrival to last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("inflight_requests_in_flight", "Generations being served", registry=r,
                               multiprocess_mode="livesum")
        # The scheduler's figures, polled by every gateway process: the most recent poll is the one to report.
        polled = functools.partial(Gauge, registry=r, multiprocess_mode="mostrecent")
        self.kv_usage = polled("inflight_kv_cache_usage_ratio", "Share of KV blocks held by running requests")
        self.kv_cached = polled("inflight_kv_cache_cached_blocks", "Free KV blocks holding reusable prefixes")
        self.running = polled("inflight_scheduler_running_requests", "Requests in the running batch")
        self.waiting = polled("inflight_scheduler_waiting_requests", "Requests waiting to be scheduled")
        self.batch_size = polled("inflight_batch_size_mean", "Mean sequences per step since start")
        self.preemptions = polled("inflight_preemptions", "Preemptions since the scheduler started")
        self.worker_restarts = polled("inflight_worker_restarts", "Worker groups replaced after a failure or a hang "
                                      "(since the scheduler started)")
        self.step_timeouts = polled("inflight_step_timeouts", "Steps the watchdog gave up on (since the scheduler "
                                    "started)")
        self.failed_requests = polled("inflight_scheduler_failed_requests", "Requests failed by a step, a sequence "
                                      "error or a lost worker group (since the scheduler started)")
        self.scheduler_restarts = polled("inflight_scheduler_restarts", "Schedulers that replaced a lost one (since "
                                         "the gateway started)")

    def exposition_registry(self) -> CollectorRegistry:
        """What the metrics port serves: this process's registry, or every gateway process's values."""
        if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
            return self.registry
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return registry

    def observe_stats(self, stats) -> None:  # type: ignore[no-untyped-def]
        total = stats.kv_blocks_total or 1
        self.kv_usage.set((stats.kv_blocks_total - stats.kv_blocks_free) / total)
        self.kv_cached.set(stats.kv_blocks_cached)
        self.running.set(stats.requests_running)
        self.waiting.set(stats.requests_waiting)
        self.batch_size.set(stats.batched_sequences_total / stats.steps_total if stats.steps_total else 0)
        self.preemptions.set(stats.preemptions_total)
        self.worker_restarts.set(stats.worker_restarts)
        self.step_timeouts.set(stats.step_timeouts)
        self.failed_requests.set(stats.failed_requests_total)
        self.scheduler_restarts.set(stats.scheduler_restarts)


def final_code(context: grpc.aio.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    """The status a call ended with: what the handler set or aborted with, else what ended it."""
    if isinstance(error, asyncio.CancelledError):  # the client went away, or its deadline passed
        remaining = context.time_remaining()
        return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else grpc.StatusCode.CANCELLED
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    return grpc.StatusCode.UNKNOWN if error is not None else grpc.StatusCode.OK


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts every call of every service the gateway hosts by method and final status code."""

    def __init__(self, requests: Counter) -> None:
        self.requests = requests

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        rpc = details.method.rsplit("/", 1)[-1]
        return replace_behavior(handler, lambda behavior: self._counted(behavior, rpc))

    def _counted(self, behavior: Callable[..., Any], rpc: str) -> Callable[..., Any] | None:
        requests = self.requests

        if inspect.isasyncgenfunction(behavior):
            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                error: BaseException | None = None
                try:
                    async for response in behavior(request, context):
                        yield response
                except BaseException as raised:
                    error = raised
                    raise
                finally:
                    requests.labels(rpc, final_code(context, error).name).inc()
            return stream
        if inspect.iscoroutinefunction(behavior):
            async def single(request: Any, context: grpc.aio.ServicerContext) -> Any:
                error: BaseException | None = None
                try:
                    return await behavior(request, context)
                except BaseException as raised:
                    error = raised
                    raise
                finally:
                    requests.labels(rpc, final_code(context, error).name).inc()
            return single
        return None
