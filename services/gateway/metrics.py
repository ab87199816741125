"""Prometheus metrics of the gateway, served on their own HTTP port."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("inflight_requests", "Finished requests by RPC and gRPC status code",
                                ["rpc", "code"], registry=r)
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
        self.in_flight = Gauge("inflight_requests_in_flight", "Generations being served", registry=r)
        self.kv_usage = Gauge("inflight_kv_cache_usage_ratio", "Share of KV blocks held by running requests", registry=r)
        self.kv_cached = Gauge("inflight_kv_cache_cached_blocks", "Free KV blocks holding reusable prefixes", registry=r)
        self.running = Gauge("inflight_scheduler_running_requests", "Requests in the running batch", registry=r)
        self.waiting = Gauge("inflight_scheduler_waiting_requests", "Requests waiting to be scheduled", registry=r)
        self.batch_size = Gauge("inflight_batch_size_mean", "Mean sequences per step since start", registry=r)
        self.preemptions = Gauge("inflight_preemptions", "Preemptions since the scheduler started", registry=r)

    def observe_stats(self, stats) -> None:  # type: ignore[no-untyped-def]
        total = stats.kv_blocks_total or 1
        self.kv_usage.set((stats.kv_blocks_total - stats.kv_blocks_free) / total)
        self.kv_cached.set(stats.kv_blocks_cached)
        self.running.set(stats.requests_running)
        self.waiting.set(stats.requests_waiting)
        self.batch_size.set(stats.batched_sequences_total / stats.steps_total if stats.steps_total else 0)
        self.preemptions.set(stats.preemptions_total)
