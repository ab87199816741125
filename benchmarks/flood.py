"""Flood the gateway with many Generate calls at once, across many tenants: load must be shed fast.

`--requests` (10,240) streaming Generate calls start together across `--tenants` (200) tenants (metadata
x-tenant-id); each is a short greedy chat prompt with small `--max-tokens`. The expected tokens of every prompt
come from a solo request first. The calls are spread over `--processes` client processes with `--channels`
connections each, released together by a barrier, so that the client is not what limits the send rate; the
report says how long the client took to issue every call and how much CPU it used, to tell client cost from
server cost. Each call's latency runs from its send to its final status, split by outcome: RESOURCE_EXHAUSTED
(shed), OK (admitted), anything else. Every second the resident memory (VmRSS) of the stack's processes is
sampled: the launched `inflight serve` and all its descendants, or with --target the `--root-pid` tree or the
`--pids` list.

Acceptance checks (exit status 1 if any fails, 2 if the stack cannot be reached or started):
  * p99 latency of RESOURCE_EXHAUSTED answers under `--reject-p99-limit` seconds (1.0);
  * every admitted (OK) call carries exactly the expected tokens of its prompt (`--no-admitted-check` skips);
  * no UNKNOWN, INTERNAL or CANCELLED (this client never cancels), and no other status than OK or
    RESOURCE_EXHAUSTED (UNAVAILABLE or a DEADLINE_EXCEEDED at the generous `--call-timeout` means it was not
    shed cleanly);
  * peak total RSS of the stack under `--max-rss-gb` (6; skipped when no process is known);
  * the scheduler drains afterwards: nothing running or waiting, every KV block free.

Run it:
  .venv/bin/python benchmarks/flood.py --launch --serve-args "--num-kv-blocks 256" --out flood.json
  .venv/bin/python benchmarks/flood.py --target 127.0.0.1:50051 --root-pid $(pgrep -f "inflight serve") \
      --requests 2000 --tenants 200
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import queue as queue_module
import random
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import grpc  # noqa: E402

from benchmarks.stack_control import (  # noqa: E402
    Stack, add_stack_arguments, check, drained, idle_text, open_stack, percentiles, print_checks, process_label,
    process_tree, raw_method, rss_bytes, stats_dict, tenant_metadata, write_report,
)
from inflight.v1 import common_pb2, generation_pb2 as gen, generation_pb2_grpc  # noqa: E402

PROMPTS = ["What is the capital of France?", "Name a color.", "Say hello.", "What is 2 + 2?",
           "Name a fruit.", "Give me one word.", "What day comes after Monday?", "Name an animal."]
GIB = 2**30


# --- One client process ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    """What one client process sends: (request index, tenant, prompt index) triples."""

    target: str
    calls: list[tuple[int, str, int]]
    payloads: list[bytes]             # one serialized request per prompt
    channels: int
    call_timeout: float


@dataclass
class CallResult:
    index: int
    prompt: int
    code: str
    seconds: float            # send to final status
    sent_at: float            # since this process was released by the barrier
    tokens: list[int]
    detail: str = ""


@dataclass
class ProcessResult:
    released_wall: float      # time.time() when the barrier let this process go
    issue_seconds: float      # from release until the last call was created
    cpu_seconds: float        # this process's CPU time while it ran the flood
    calls: list[CallResult] = field(default_factory=list)
    loop_lag: list[float] = field(default_factory=list)  # how late 10 ms sleeps woke: the client's own delay
    error: str = ""


async def one_call(method: Any, job: Job, call: tuple[int, str, int], released: float) -> CallResult:
    index, tenant, prompt = call
    started = time.perf_counter()
    tokens: list[int] = []
    code, detail = "OK", ""
    try:
        async for response in method(job.payloads[prompt], timeout=job.call_timeout, metadata=tenant_metadata(tenant)):
            tokens.extend(response.token_ids)
    except grpc.aio.AioRpcError as error:
        code, detail = error.code().name, (error.details() or "")[:200]
    return CallResult(index, prompt, code, time.perf_counter() - started, started - released, tokens, detail)


async def measure_lag(lags: list[float], done: asyncio.Event) -> None:
    while not done.is_set():
        before = time.perf_counter()
        await asyncio.sleep(0.01)
        lags.append(time.perf_counter() - before - 0.01)


async def flood_process(job: Job, barrier: Any) -> ProcessResult:
    options = [("grpc.use_local_subchannel_pool", 1)]  # one TCP connection per channel
    channels = [grpc.aio.insecure_channel(job.target, options=options) for _ in range(job.channels)]
    try:
        await asyncio.gather(*(asyncio.wait_for(c.channel_ready(), 60) for c in channels))
        methods = [raw_method(c, "Generate") for c in channels]
        await asyncio.get_running_loop().run_in_executor(None, barrier.wait)
        released, released_wall, cpu0 = time.perf_counter(), time.time(), time.process_time()
        lags: list[float] = []
        done = asyncio.Event()
        lag_task = asyncio.ensure_future(measure_lag(lags, done))
        tasks = []
        for number, call in enumerate(job.calls):
            tasks.append(asyncio.ensure_future(one_call(methods[number % len(methods)], job, call, released)))
            if number % 256 == 255:
                await asyncio.sleep(0)  # let the calls made so far start sending
        await asyncio.sleep(0)
        issued = time.perf_counter() - released
        results = await asyncio.gather(*tasks)
        done.set()
        await lag_task
        issue_seconds = max(issued, max((r.sent_at for r in results), default=0.0))
        return ProcessResult(released_wall, issue_seconds, time.process_time() - cpu0, list(results), lags)
    finally:
        for channel in channels:
            await channel.close()


def process_main(job: Job, barrier: Any, results: Any) -> None:
    try:
        results.put(asyncio.run(flood_process(job, barrier)))
    except Exception as error:  # noqa: BLE001 - reported to the parent, which fails the run
        barrier.abort()
        results.put(ProcessResult(0.0, 0.0, 0.0, error=f"{type(error).__name__}: {error}"))


# --- Memory of the stack --------------------------------------------------------------------------

class MemorySampler:
    """VmRSS of the stack's processes: the tree under root_pid (walked again each time), or fixed pids."""

    def __init__(self, root_pid: int | None, pids: Sequence[int]) -> None:
        self.root_pid, self.pids = root_pid, list(pids)
        self.peak: dict[str, int] = {}
        self.peak_total = 0
        self.samples: list[tuple[float, int]] = []

    @property
    def enabled(self) -> bool:
        return self.root_pid is not None or bool(self.pids)

    def sample(self, at: float) -> None:
        if not self.enabled:
            return
        pids = process_tree(self.root_pid) if self.root_pid is not None else self.pids
        total = 0
        for pid in pids:
            rss = rss_bytes(pid)
            if rss is None:
                continue
            label = process_label(pid)
            self.peak[label] = max(self.peak.get(label, 0), rss)
            total += rss
        self.peak_total = max(self.peak_total, total)
        self.samples.append((round(at, 2), total))

    def report(self) -> dict[str, Any]:
        return {"measured": self.enabled, "peak_total_bytes": self.peak_total,
                "peak_per_process_bytes": dict(sorted(self.peak.items())), "samples_total_bytes": self.samples}


# --- The flood ------------------------------------------------------------------------------------

def expected_tokens(target: str, payloads: list[bytes], timeout: float) -> list[list[int]]:
    """The solo answer to each prompt, one at a time."""
    with grpc.insecure_channel(target) as channel:
        method = raw_method(channel, "Generate")
        expected = []
        for payload in payloads:
            tokens: list[int] = []
            for response in method(payload, timeout=timeout, metadata=tenant_metadata("flood-solo")):
                tokens.extend(response.token_ids)
            expected.append(tokens)
        return expected


def make_payloads(count: int, max_tokens: int) -> list[bytes]:
    payloads = []
    for index in range(count):
        request = gen.GenerateRequest(max_tokens=max_tokens)  # temperature unset: greedy
        request.messages.add(role="user", content=PROMPTS[index % len(PROMPTS)])
        payloads.append(request.SerializeToString())
    return payloads


def make_jobs(args: argparse.Namespace, payloads: list[bytes], processes: int) -> list[Job]:
    calls = [(i, f"tenant-{i % args.tenants:04d}", i % len(payloads)) for i in range(args.requests)]
    random.Random(args.seed).shuffle(calls)
    return [Job(args.target, calls[p::processes], payloads, args.channels, args.call_timeout) for p in range(processes)]


def run_flood(jobs: list[Job], memory: MemorySampler, interval: float) -> tuple[list[ProcessResult], float]:
    """Start the client processes, release them together, sample memory until all report back."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(len(jobs) + 1), context.Queue()
    workers = [context.Process(target=process_main, args=(job, barrier, results), daemon=True) for job in jobs]
    for worker in workers:
        worker.start()
    try:
        barrier.wait(timeout=300)
    except threading.BrokenBarrierError:
        errors = [results.get(timeout=10).error for _ in range(sum(1 for w in workers if w.exitcode is not None))]
        raise RuntimeError(f"a client process failed before the start: {errors}") from None
    released = time.perf_counter()
    collected: list[ProcessResult] = []
    next_sample = released
    while len(collected) < len(jobs):
        now = time.perf_counter()
        if now >= next_sample:
            memory.sample(now - released)
            next_sample = now + interval
        try:
            collected.append(results.get(timeout=max(0.05, next_sample - time.perf_counter())))
        except queue_module.Empty:
            if not any(w.is_alive() for w in workers) and results.empty():
                break
    wall = time.perf_counter() - released
    for worker in workers:
        worker.join(10)
    memory.sample(time.perf_counter() - released)
    return collected, wall


# --- Report ---------------------------------------------------------------------------------------

def outcome_of(call: CallResult) -> str:
    return {"OK": "admitted (OK)", "RESOURCE_EXHAUSTED": "rejected (RESOURCE_EXHAUSTED)"}.get(call.code, call.code)


def summarize(args: argparse.Namespace, processes: list[ProcessResult], wall: float, expected: list[list[int]],
              memory: MemorySampler, stats_before: dict[str, int]) -> dict[str, Any]:
    calls = [c for p in processes for c in p.calls]
    by_outcome: dict[str, list[float]] = defaultdict(list)
    for call in calls:
        by_outcome[outcome_of(call)].append(call.seconds)
    wrong = [c for c in calls if c.code == "OK" and c.tokens != expected[c.prompt]]
    admitted_then_failed = [c for c in calls if c.code not in ("OK", "RESOURCE_EXHAUSTED") and c.tokens]
    details = Counter(f"{c.code}: {c.detail[:100]}" for c in calls if c.code != "OK")
    return {
        "target": args.target, "requests": args.requests, "tenants": args.tenants, "max_tokens": args.max_tokens,
        "seed": args.seed, "calls_reported": len(calls), "wall_seconds": round(wall, 3),
        "expected_tokens": expected,
        "status_counts": dict(Counter(c.code for c in calls).most_common()),
        "latency_s": {k: percentiles(v) for k, v in sorted(by_outcome.items())},
        "status_details": dict(details.most_common(20)),
        "admitted_wrong_tokens": len(wrong),
        "admitted_wrong_examples": [{"index": c.index, "tokens": c.tokens, "expected": expected[c.prompt]} for c in wrong[:10]],
        "admitted_then_failed": len(admitted_then_failed),
        "calls": {"columns": ["index", "tenant_index", "sent_at_s", "seconds", "code"],
                  "rows": [[c.index, c.index % args.tenants, round(c.sent_at, 4), round(c.seconds, 4), c.code]
                           for c in sorted(calls, key=lambda c: c.index)]},
        "client": client_report(processes),
        "memory": memory.report(),
        "stats_before": stats_before,
    }


def client_report(processes: list[ProcessResult]) -> dict[str, Any]:
    ok = [p for p in processes if not p.error]
    lags = [lag for p in ok for lag in p.loop_lag]
    skew = max((p.released_wall for p in ok), default=0.0) - min((p.released_wall for p in ok), default=0.0)
    return {
        "processes": len(processes), "errors": [p.error for p in processes if p.error],
        "issue_seconds_max": round(max((p.issue_seconds for p in ok), default=0.0), 3),
        "issue_seconds_per_process": [round(p.issue_seconds, 3) for p in ok],
        "cpu_seconds_per_process": [round(p.cpu_seconds, 2) for p in ok],
        "release_skew_seconds": round(skew, 4),
        "calls_per_process": [len(p.calls) for p in ok],
        "event_loop_lag_s": {"p99": percentiles(lags).get("p99", 0.0), "max": max(lags, default=0.0)},
    }


def acceptance(args: argparse.Namespace, report: dict[str, Any], idle: bool, final: dict[str, int] | str
               ) -> dict[str, dict[str, Any]]:
    codes = Counter(report["status_counts"])
    rejected = report["latency_s"].get("rejected (RESOURCE_EXHAUSTED)", {"count": 0})
    admitted = codes["OK"]
    others = {k: v for k, v in codes.items() if k not in ("OK", "RESOURCE_EXHAUSTED")}
    memory = report["memory"]
    peak_gb = memory["peak_total_bytes"] / GIB
    missing = args.requests - report["calls_reported"]
    return {
        "rejections_fast": check(rejected["count"] == 0 or rejected["p99"] < args.reject_p99_limit,
                                 f"{rejected['count']} rejected, p99 {rejected.get('p99', 0):.3f} s "
                                 f"(limit {args.reject_p99_limit} s)"),
        "admitted_exact_tokens": check(not args.admitted_check or (admitted > 0 and report["admitted_wrong_tokens"] == 0),
                                       f"{admitted} admitted, {report['admitted_wrong_tokens']} with other tokens",
                                       skipped=not args.admitted_check),
        "no_unknown_internal_cancelled": check(codes["UNKNOWN"] + codes["INTERNAL"] + codes["CANCELLED"] == 0,
                                               f"{codes['UNKNOWN']} UNKNOWN, {codes['INTERNAL']} INTERNAL, "
                                               f"{codes['CANCELLED']} CANCELLED"),
        "only_ok_or_rejected": check(not others and missing == 0,
                                     f"other statuses {others or 'none'}; {missing} calls unreported"),
        "memory_bounded": check(not memory["measured"] or peak_gb < args.max_rss_gb,
                                f"peak total RSS {peak_gb:.2f} GiB (limit {args.max_rss_gb} GiB)" if memory["measured"]
                                else "not measured (give --root-pid or --pids with --target)",
                                skipped=not memory["measured"]),
        "drained_all_blocks_free": check(idle, idle_text(final)),
    }


def print_summary(report: dict[str, Any]) -> None:
    client = report["client"]
    print(f"\n{report['calls_reported']}/{report['requests']} calls reported in {report['wall_seconds']:.1f} s "
          f"across {report['tenants']} tenants")
    print(f"client: {client['processes']} processes; issued every call within {client['issue_seconds_max']:.2f} s "
          f"(per process {client['issue_seconds_per_process']}), release skew {client['release_skew_seconds']} s, "
          f"client CPU {client['cpu_seconds_per_process']} s, event-loop lag p99 "
          f"{client['event_loop_lag_s']['p99']:.3f} s max {client['event_loop_lag_s']['max']:.3f} s")
    print(f"{'outcome':<32} {'count':>6} {'p50 s':>8} {'p90 s':>8} {'p99 s':>8} {'max s':>8}")
    for outcome, lat in report["latency_s"].items():
        print(f"{outcome:<32} {lat['count']:>6} {lat['p50']:>8.3f} {lat['p90']:>8.3f} {lat['p99']:>8.3f} {lat['max']:>8.3f}")
    for detail, count in list(report["status_details"].items())[:6]:
        print(f"  {count:>6} x {detail}")
    print(f"admitted with other tokens: {report['admitted_wrong_tokens']}; "
          f"failed after their first token: {report['admitted_then_failed']}")
    memory = report["memory"]
    if memory["measured"]:
        print(f"peak RSS total {memory['peak_total_bytes'] / GIB:.2f} GiB; per process (MiB): " + ", ".join(
            f"{k} {v / 2**20:.0f}" for k, v in memory["peak_per_process_bytes"].items()))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_stack_arguments(parser)
    parser.add_argument("--requests", type=int, default=10_240)
    parser.add_argument("--tenants", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=4, help="distinct chat prompts (each checked against its solo run)")
    parser.add_argument("--admitted-check", action=argparse.BooleanOptionalAction, default=True,
                        help="admitted calls must return exactly the solo tokens of their prompt")
    parser.add_argument("--processes", type=int, default=0, help="client processes (0: one per CPU, at most 8)")
    parser.add_argument("--channels", type=int, default=8, help="gRPC connections per client process")
    parser.add_argument("--call-timeout", type=float, default=600.0)
    parser.add_argument("--reject-p99-limit", type=float, default=1.0)
    parser.add_argument("--max-rss-gb", type=float, default=6.0)
    parser.add_argument("--pids", default="", help="with --target: comma-separated pids whose RSS to sample")
    parser.add_argument("--root-pid", type=int, default=0, help="with --target: sample this pid and its descendants")
    parser.add_argument("--sample-interval", type=float, default=1.0)
    parser.add_argument("--idle-timeout", type=float, default=60.0)
    return parser.parse_args(argv)


async def stats_now(target: str) -> dict[str, int]:
    async with grpc.aio.insecure_channel(target) as channel:
        return stats_dict(await generation_pb2_grpc.AdminStub(channel).GetStats(common_pb2.GetStatsRequest(), timeout=10))


def flood(args: argparse.Namespace, stack: Stack) -> dict[str, Any]:
    root = stack.root_pid or args.root_pid or None
    memory = MemorySampler(root, [int(p) for p in args.pids.split(",") if p.strip()])
    payloads = make_payloads(args.prompts, args.max_tokens)
    expected = expected_tokens(stack.target, payloads, args.call_timeout)
    print(f"expected tokens per prompt: {[len(e) for e in expected]}", flush=True)
    stats_before = asyncio.run(stats_now(stack.target))
    memory.sample(0.0)
    processes = args.processes or min(8, os.cpu_count() or 1)
    jobs = make_jobs(args, payloads, processes)
    print(f"flooding {stack.target} with {args.requests} Generate calls from {processes} processes x "
          f"{args.channels} channels", flush=True)
    results, wall = run_flood(jobs, memory, args.sample_interval)
    report = summarize(args, results, wall, expected, memory, stats_before)
    idle, final = asyncio.run(drained(stack.target, args.idle_timeout))
    report["stats_after"] = final
    report["checks"] = acceptance(args, report, idle, final)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        stack = open_stack(args)
    except (RuntimeError, TimeoutError) as error:
        print(f"no stack to flood: {error}", file=sys.stderr)
        return 2
    args.target = stack.target
    try:
        report = flood(args, stack)
    except (grpc.RpcError, RuntimeError) as error:
        print(f"the flood could not start: {error}", file=sys.stderr)
        return 2
    finally:
        code = stack.stop()
        if code is not None:
            print(f"stopped the launched stack (exit status {code})")
    print_summary(report)
    report["passed"] = print_checks(report["checks"])
    write_report(args.out, report)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
