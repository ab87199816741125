"""The scheduler's configuration: one typed object, built from the command line."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from inflight.tracing import add_otlp_traces_endpoint
from scheduler.policy import POLICIES

OVERLAP_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class SchedulerConfig:
    worker: str                  # gRPC target of worker rank 0
    listen: str                  # gRPC address served to gateways
    max_num_batched_tokens: int  # 0: what the worker advertises
    max_num_seqs: int            # 0: what the worker advertises
    policy: str                  # fcfs, priority or fair (weighted fair sharing across tenants)
    tenant_weights: str          # for fair: "tenantA=2,tenantB=1" (others weigh 1)
    no_prefix_caching: bool
    connect_timeout: float       # seconds to wait for the worker at start and after a failure
    max_waiting_requests: int    # held beyond a full batch: past max_num_seqs + this, RESOURCE_EXHAUSTED
    step_timeout: float          # watchdog: seconds a step may take before the worker group counts as hung...
    step_timeout_per_token: float  # ...plus this many seconds per token in the step
    keepalive_seconds: float     # ping interval on the worker link; the scheduler's server accepts half of it
    exit_with_parent: bool       # started by a launcher: die with it
    log_level: str
    overlap: str = "auto"        # on: plan step N+1 while step N runs; off; auto: on unless the worker computes on CPU
    steps_in_flight: int = 2     # with overlap: how many (2: one runs while the next waits behind it)
    kv_event_history: int = 4096  # KV event batches kept for subscribers that resume
    otlp_traces_endpoint: str = ""  # OTLP/gRPC collector for traces (http://host:4317); empty: not traced

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--worker", default="127.0.0.1:50061")
        parser.add_argument("--listen", default="127.0.0.1:50060")
        parser.add_argument("--max-num-batched-tokens", type=int, default=0)
        parser.add_argument("--max-num-seqs", type=int, default=0)
        parser.add_argument("--policy", default="fcfs", choices=POLICIES)
        parser.add_argument("--tenant-weights", default="")
        parser.add_argument("--no-prefix-caching", action="store_true")
        parser.add_argument("--overlap", default="auto", choices=OVERLAP_MODES,
                            help="overlap scheduling: plan and send step N+1 while step N runs (on), or each step "
                                 "after the previous one's result (off); auto: on unless the worker runs on CPU, "
                                 "where the host is the device and planning ahead only takes cores from it")
        parser.add_argument("--steps-in-flight", type=int, default=2,
                            help="with overlap, steps sent ahead of their results (2 or more; each one more lets "
                                 "the scheduler and worker take a step longer to turn a result into the next plan, "
                                 "and computes one more token past a stop that is then dropped)")
        parser.add_argument("--connect-timeout", type=float, default=600.0)
        parser.add_argument("--max-waiting-requests", type=int, default=1024)
        parser.add_argument("--step-timeout", type=float, default=30.0,
                            help="seconds before an unfinished step marks the worker group hung (0: never)")
        parser.add_argument("--step-timeout-per-token", type=float, default=0.05,
                            help="seconds added to --step-timeout per token in the step")
        parser.add_argument("--keepalive-seconds", type=float, default=20.0)
        parser.add_argument("--exit-with-parent", action="store_true", help="exit when the parent process dies")
        parser.add_argument("--log-level", default="info")
        parser.add_argument("--kv-event-history", type=int, default=4096,
                            help="prefix-cache event batches kept for SubscribeKvEvents subscribers that resume")
        add_otlp_traces_endpoint(parser)

    def overlaps(self, worker_device: str) -> bool:
        """Whether steps overlap with a worker group on this device ("cpu", "cuda:0", ...)."""
        return self.overlap == "on" or (self.overlap == "auto" and worker_device != "cpu")

    def step_bound(self, num_tokens: int) -> float:
        """The watchdog's bound for a step of num_tokens tokens (0: unbounded)."""
        return self.step_timeout + self.step_timeout_per_token * num_tokens if self.step_timeout > 0 else 0.0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SchedulerConfig:
        return cls(**{name: getattr(args, name) for name in cls.__dataclass_fields__})
