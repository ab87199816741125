"""Fuzz the public API while healthy "bystander" requests run: one bad request must harm nothing else.

What it sends (seeded, bounded concurrency, `--requests` calls in all):
  * sampling extremes: temperature 1e-38 / 1e-45 / inf / nan / 1e30 ..., odd top_p, top_k, min_p, penalties,
    seeds, min_tokens / max_tokens edges, top_logprobs 0..25, stop strings and stop_token_ids edges, priority;
  * odd inputs: empty prompt, prompt and messages together, thousands of empty messages, unknown roles,
    prompts over the context length and over the message size limit, unicode and control characters,
    chat-template control text typed into content, request_id edges (also one id reused across tenants);
  * raw malformed bytes through serializer-less channel methods: invalid UTF-8 in prompt, messages[i].content,
    request_id, stop[i] and Tokenize's prompt, truncated messages, wrong wire types, random garbage;
  * Tokenize / Detokenize (ids out of vocabulary, huge lists), Abort of unknown ids, Abort mid-stream;
  * client cancellations and short deadlines mid-stream.
Meanwhile `--bystanders` greedy requests (fixed prompts, ignore_eos) run in a loop; their tokens are taken from
a solo run of each before the fuzzing starts.

Acceptance checks (exit status 1 if any fails, 2 if the stack cannot be reached or started):
  * no UNKNOWN or INTERNAL status on any call;
  * no worker-group loss: no UNAVAILABLE answer, no growth of any `*_restarts` field of Admin/GetStats
    (looked up with Stats.DESCRIPTOR so the script works with or without them), no reset of its counters;
  * every bystander run completes OK with exactly its expected token ids;
  * no CANCELLED / DEADLINE_EXCEEDED the client did not cause; every OK generation ends with a finish_reason;
  * after the run the scheduler drains: requests_running == requests_waiting == 0 and every KV block free.
Statuses that are right for bad input (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, OUT_OF_RANGE, ALREADY_EXISTS,
NOT_FOUND, client-caused CANCELLED / DEADLINE_EXCEEDED ...) are counted and reported, not failed.

Run it against a serving stack, or let it start (and stop) one:
  .venv/bin/python benchmarks/fuzz.py --target 127.0.0.1:50051 --requests 3000 --out fuzz.json
  .venv/bin/python benchmarks/fuzz.py --launch --serve-args "--num-kv-blocks 256" --requests 300 --seed 1
`--only sampling,malformed` restricts the mix to some case families (see --list-families).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import grpc  # noqa: E402

from benchmarks.fuzz_cases import FAMILIES, Case, CaseMaker, make_cases  # noqa: E402
from benchmarks.stack_control import (  # noqa: E402
    RawCaller, StatsWatch, add_stack_arguments, check, idle_text, open_stack, percentiles, print_checks,
    restart_fields, wait_idle, write_report,
)
from inflight.v1 import common_pb2, generation_pb2 as gen, generation_pb2_grpc  # noqa: E402

FAIL_CODES = frozenset({"UNKNOWN", "INTERNAL"})
LOSS_CODES = frozenset({"UNAVAILABLE"})
CLIENT_CODES = ("CANCELLED", "DEADLINE_EXCEEDED")  # fine when the client caused them, failures when not


# --- Running one case -----------------------------------------------------------------------------

@dataclass
class Outcome:
    family: str
    label: str
    method: str
    code: str
    client_caused: bool = False
    unfinished_ok: bool = False        # OK, but the generation never carried a finish_reason
    detail: str = ""
    started: float = 0.0
    seconds: float = 0.0

    @property
    def unexplained(self) -> bool:
        """A CANCELLED or DEADLINE_EXCEEDED the client did not cause."""
        return self.code in CLIENT_CODES and not self.client_caused

    @property
    def failed(self) -> bool:
        return self.code in FAIL_CODES | LOSS_CODES or self.unexplained or self.unfinished_ok


@dataclass
class CallState:
    cancelled: bool = False   # the client cancelled the call itself
    finished: bool = False    # a response carried a finish_reason
    responses: int = 0


def cancel_later(call: Any, delay: float | None, state: CallState) -> asyncio.TimerHandle | None:
    if delay is None:
        return None

    def fire() -> None:
        state.cancelled = call.cancel() or state.cancelled

    return asyncio.get_running_loop().call_later(delay, fire)


async def consume(caller: RawCaller, case: Case, timeout: float, state: CallState,
                  side: list[Awaitable[list[Outcome]]]) -> None:
    """Send the case and read its answer (every streamed response), cancelling or aborting as it asks."""
    call = caller(case.method, case.payload, timeout, case.tenant)
    timer = cancel_later(call, case.cancel_after_s, state)
    try:
        if case.method != "Generate":
            response = await call
            state.finished = case.method != "Complete" or bool(response.finish_reason)
            return
        async for response in call:
            state.responses += 1
            state.finished = state.finished or bool(response.finish_reason)
            if case.abort_after_first and state.responses == 1:
                abort = replace(case, family="abort_mid_stream", method="Abort", abort_after_first="",
                                payload=gen.AbortRequest(request_id=case.abort_after_first).SerializeToString())
                side.append(asyncio.ensure_future(run_one(caller, abort, timeout)))
            if case.cancel_after_responses is not None and state.responses >= case.cancel_after_responses:
                state.cancelled = call.cancel() or state.cancelled
                return
    finally:
        if timer is not None:
            timer.cancel()


async def run_one(caller: RawCaller, case: Case, safety_timeout: float) -> list[Outcome]:
    """One call to its final status (plus any Abort it sent); a CancelledError is swallowed only when this
    call cancelled itself."""
    state = CallState()
    side: list[Awaitable[list[Outcome]]] = []
    timeout = case.deadline if case.deadline is not None else safety_timeout
    started = time.perf_counter()
    code, detail = "OK", ""
    try:
        await consume(caller, case, timeout, state, side)
    except grpc.aio.AioRpcError as error:
        code, detail = error.code().name, (error.details() or "")[:300]
    except asyncio.CancelledError:
        if not state.cancelled:
            raise
        code, detail = "CANCELLED", "cancelled by the client"
    except Exception as error:  # noqa: BLE001 - the client library refused to send it: not the server's answer
        code, detail = "CLIENT_ERROR", f"{type(error).__name__}: {str(error)[:200]}"
    if state.cancelled and code == "OK" and not state.finished:
        code, detail = "CANCELLED", "cancelled by the client"
    client_caused = (code == "CANCELLED" and state.cancelled) or (code == "DEADLINE_EXCEEDED" and case.deadline is not None)
    outcome = Outcome(case.family, case.label, case.method, code, client_caused,
                      unfinished_ok=code == "OK" and not state.finished and not state.cancelled,
                      detail=detail, started=started, seconds=time.perf_counter() - started)
    outcomes = [outcome]
    for extra in side:  # the Abort sent mid-stream
        outcomes.extend(await extra)
    return outcomes


async def run_case(caller: RawCaller, case: Case, safety_timeout: float) -> list[Outcome]:
    """run_one, or with a twin_tenant the same request from both tenants, 50 ms apart."""
    if case.twin_tenant is None:
        return await run_one(caller, case, safety_timeout)
    first = asyncio.ensure_future(run_one(caller, replace(case, twin_tenant=None), safety_timeout))
    await asyncio.sleep(0.05)
    second = await run_one(caller, replace(case, tenant=case.twin_tenant, twin_tenant=None), safety_timeout)
    return await first + second


# --- Bystanders ----------------------------------------------------------------------------------

BYSTANDER_PROMPTS = ["Name three rivers in Europe.", "What is the capital of France?", "Write a haiku about the sea.",
                     "Explain photosynthesis in one sentence.", "List four prime numbers.", "Describe a cat to a child."]


@dataclass
class Bystander:
    name: str
    request: gen.GenerateRequest
    expected: list[int] = field(default_factory=list)


@dataclass
class BystanderRun:
    name: str
    ok: bool
    code: str
    problem: str
    seconds: float


def make_bystanders(count: int) -> list[Bystander]:
    bystanders = []
    for index in range(count):
        request = gen.GenerateRequest(max_tokens=24 + 8 * (index % 4), temperature=0.0, ignore_eos=True)
        request.messages.add(role="user", content=BYSTANDER_PROMPTS[index % len(BYSTANDER_PROMPTS)])
        bystanders.append(Bystander(f"bystander-{index}", request))
    return bystanders


async def generate_tokens(caller: RawCaller, request: gen.GenerateRequest, tenant: str,
                          timeout: float) -> tuple[list[int], int]:
    tokens, finish = [], 0
    async for response in caller("Generate", request.SerializeToString(), timeout, tenant):
        tokens.extend(response.token_ids)
        finish = response.finish_reason or finish
    return tokens, finish


async def take_expected(caller: RawCaller, bystanders: list[Bystander], timeout: float) -> None:
    for bystander in bystanders:
        bystander.expected, finish = await generate_tokens(caller, bystander.request, bystander.name, timeout)
        print(f"  {bystander.name}: {len(bystander.expected)} expected tokens "
              f"({common_pb2.FinishReason.Name(finish)})", flush=True)


async def run_bystander(caller: RawCaller, bystander: Bystander, timeout: float) -> BystanderRun:
    started = time.perf_counter()
    try:
        tokens, finish = await generate_tokens(caller, bystander.request, bystander.name, timeout)
    except grpc.aio.AioRpcError as error:
        return BystanderRun(bystander.name, False, error.code().name, (error.details() or "")[:200],
                            time.perf_counter() - started)
    problem = ""
    if tokens != bystander.expected:
        first = next((i for i, (a, b) in enumerate(zip(tokens, bystander.expected)) if a != b),
                     min(len(tokens), len(bystander.expected)))
        problem = f"tokens differ from index {first} ({len(tokens)} vs {len(bystander.expected)} expected)"
    elif finish != common_pb2.FINISH_REASON_LENGTH:
        problem = f"finish_reason {common_pb2.FinishReason.Name(finish)}"
    return BystanderRun(bystander.name, not problem, "OK", problem, time.perf_counter() - started)


async def bystander_loop(caller: RawCaller, bystander: Bystander, done: asyncio.Event, timeout: float,
                         runs: list[BystanderRun]) -> None:
    while not done.is_set():
        runs.append(await run_bystander(caller, bystander, timeout))
        if not runs[-1].ok:
            await asyncio.sleep(0.5)  # a broken stack answers at once: do not spin


# --- The fuzz phase -------------------------------------------------------------------------------

@dataclass
class FuzzRun:
    cases: int                                          # how many the run sends
    cases_done: int = 0
    outcomes: list[Outcome] = field(default_factory=list)
    bystander_runs: list[BystanderRun] = field(default_factory=list)
    in_flight: dict[int, str] = field(default_factory=dict)
    suspects: list[str] = field(default_factory=list)   # in flight when the first UNAVAILABLE came back
    first_loss_at: float | None = None

    def record(self, outcomes: list[Outcome], t0: float) -> None:
        """One case's outcomes; progress every tenth of the cases."""
        self.outcomes.extend(outcomes)
        if self.first_loss_at is None and any(o.code in LOSS_CODES for o in outcomes):
            self.first_loss_at = time.perf_counter() - t0
            self.suspects = sorted(set(self.in_flight.values()))
        self.cases_done += 1
        if self.cases_done % max(1, self.cases // 10) == 0 or self.cases_done == self.cases:
            print(f"  {self.cases_done}/{self.cases} cases ({time.perf_counter() - t0:.0f} s)", flush=True)


async def fuzz_worker(callers: list[RawCaller], queue: asyncio.Queue[tuple[int, Case]], run: FuzzRun,
                      safety_timeout: float, t0: float) -> None:
    while True:
        try:
            index, case = queue.get_nowait()
        except asyncio.QueueEmpty:
            return
        run.in_flight[index] = f"{case.family}: {case.label}"
        outcomes = await run_case(callers[index % len(callers)], case, safety_timeout)
        del run.in_flight[index]
        run.record(outcomes, t0)


async def fuzz(args: argparse.Namespace, target: str) -> dict[str, Any]:
    """Expected bystander tokens first, then the fuzz phase; returns the report without its checks."""
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 64 * 2**20)]
    channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(5)]
    callers = [RawCaller(c) for c in channels[1:]]
    own, admin = RawCaller(channels[0]), generation_pb2_grpc.AdminStub(channels[0])
    generation = generation_pb2_grpc.GenerationStub(channels[0])
    try:
        info = await generation.ModelInfo(gen.ModelInfoRequest(), timeout=10)
        bystanders = make_bystanders(args.bystanders)
        print(f"model {info.model_name}: context {info.context_length}, vocab {info.vocab_size}; "
              f"taking bystanders' expected tokens", flush=True)
        await take_expected(own, bystanders, args.call_timeout)
        cases = make_cases(CaseMaker(random.Random(args.seed), info), args.requests, set(filter(None, args.only.split(","))))
        print(f"{len(cases)} fuzz cases, concurrency {args.concurrency}, {len(bystanders)} bystanders", flush=True)
        return await fuzz_phase(args, cases, callers, own, admin, bystanders, info)
    finally:
        for channel in channels:
            await channel.close()


async def fuzz_phase(args: argparse.Namespace, cases: list[Case], callers: list[RawCaller], own: RawCaller,
                     admin: generation_pb2_grpc.AdminStub, bystanders: list[Bystander],
                     info: gen.ModelInfoResponse) -> dict[str, Any]:
    """The cases at --concurrency beside the bystander loops and the stats watch, then the drain."""
    run, done, watch = FuzzRun(len(cases)), asyncio.Event(), StatsWatch()
    t0 = time.perf_counter()
    watcher = asyncio.ensure_future(watch.run(admin, done, t0))
    await asyncio.sleep(0.2)  # a first stats sample before anything starts
    loops = [asyncio.ensure_future(bystander_loop(own, b, done, args.call_timeout, run.bystander_runs))
             for b in bystanders]
    queue: asyncio.Queue[tuple[int, Case]] = asyncio.Queue()
    for item in enumerate(cases):
        queue.put_nowait(item)
    await asyncio.gather(*(fuzz_worker(callers, queue, run, args.call_timeout, t0) for _ in range(args.concurrency)))
    fuzz_seconds = time.perf_counter() - t0
    done.set()
    await asyncio.gather(*loops, watcher)
    print("fuzzing done; waiting for the scheduler to drain", flush=True)
    idle, final = await wait_idle(admin, args.idle_timeout)
    if isinstance(final, dict):
        watch.observe(final, time.perf_counter() - t0)
    return summarize(args, run, watch, bystanders, info, t0, fuzz_seconds, idle, final)


# --- Report and acceptance ------------------------------------------------------------------------

def status_of(outcome: Outcome) -> str:
    return outcome.code + (" (client)" if outcome.client_caused else "")


def summarize(args: argparse.Namespace, run: FuzzRun, watch: StatsWatch, bystanders: list[Bystander],
              info: gen.ModelInfoResponse, t0: float, fuzz_seconds: float, idle: bool,
              final: dict[str, int] | str) -> dict[str, Any]:
    outcomes = run.outcomes
    by_family: dict[str, Counter[str]] = defaultdict(Counter)
    for o in outcomes:
        by_family[o.family][status_of(o)] += 1
    harmed = [asdict(r) for r in run.bystander_runs if not r.ok]
    return {
        "target": args.target, "seed": args.seed, "requests": args.requests, "concurrency": args.concurrency,
        "model": {"name": info.model_name, "context_length": info.context_length, "vocab_size": info.vocab_size},
        "fuzz_seconds": round(fuzz_seconds, 2), "calls": len(outcomes),
        "unexplained_cancel_or_deadline": sum(1 for o in outcomes if o.unexplained),
        "unfinished_ok": sum(1 for o in outcomes if o.unfinished_ok),
        "status_counts": dict(Counter(status_of(o) for o in outcomes).most_common()),
        "by_family": {k: dict(v.most_common()) for k, v in sorted(by_family.items())},
        "failures": [asdict(o) for o in outcomes if o.failed][:100],
        "slowest": [{"family": o.family, "label": o.label, "method": o.method, "code": o.code,
                     "seconds": round(o.seconds, 2), "started_at_s": round(o.started - t0, 2)}
                    for o in sorted(outcomes, key=lambda o: -o.seconds)[:10]],
        "unavailable": {"first_at_s": run.first_loss_at, "in_flight_then": run.suspects},
        "bystanders": {
            "expected": {b.name: b.expected for b in bystanders},
            "runs": len(run.bystander_runs), "harmed": len(harmed), "harmed_examples": harmed[:30],
            "latency_s": percentiles([r.seconds for r in run.bystander_runs if r.ok]),
            "codes": dict(Counter(r.code for r in run.bystander_runs)),
        },
        "stats": {"first": watch.first, "final": final, "polls": watch.polls, "poll_failures": dict(watch.failures),
                  "restart_fields": restart_fields(), "restart_growth": watch.restart_growth(),
                  "counter_resets": watch.counter_resets, "idle_after": idle},
    }


def acceptance(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    codes = Counter(report["status_counts"])  # client-caused CANCELLED/DEADLINE_EXCEEDED carry " (client)"
    unexplained, unfinished = report["unexplained_cancel_or_deadline"], report["unfinished_ok"]
    by, stats = report["bystanders"], report["stats"]
    growth = {k: v for k, v in stats["restart_growth"].items() if v}
    loss_bits = [f"{codes['UNAVAILABLE']} UNAVAILABLE calls",
                 f"restart counters {stats['restart_growth'] or '(no such Stats field)'}",
                 f"{len(stats['counter_resets'])} counter resets"]
    return {
        "no_unknown_or_internal": check(codes["UNKNOWN"] + codes["INTERNAL"] == 0,
                                        f"{codes['UNKNOWN']} UNKNOWN, {codes['INTERNAL']} INTERNAL"),
        "no_worker_group_loss": check(codes["UNAVAILABLE"] == 0 and not growth and not stats["counter_resets"],
                                      ", ".join(loss_bits)),
        "bystanders_unharmed": check(by["harmed"] == 0 and by["runs"] > 0,
                                     f"{by['runs'] - by['harmed']}/{by['runs']} bystander runs OK with exact tokens"),
        "no_unexplained_cancel_or_deadline": check(unexplained == 0, f"{unexplained} CANCELLED/DEADLINE_EXCEEDED "
                                                                     "the client did not cause"),
        "ok_generations_finish": check(unfinished == 0, f"{unfinished} OK generations without a finish_reason"),
        "drained_all_blocks_free": check(stats["idle_after"], f"after {report['idle_timeout_s']:.0f} s: "
                                         + idle_text(stats["final"])),
    }


def print_summary(report: dict[str, Any]) -> None:
    print(f"\n{report['calls']} calls in {report['fuzz_seconds']} s; final status codes:")
    for code, count in report["status_counts"].items():
        print(f"  {code:<32} {count}")
    print("by family:")
    for family, counts in report["by_family"].items():
        print(f"  {family:<18} " + ", ".join(f"{c} {n}" for c, n in counts.items()))
    by = report["bystanders"]
    lat = by["latency_s"]
    print(f"bystanders: {by['runs']} runs, {by['harmed']} harmed, codes {by['codes']}; "
          f"OK latency p50 {lat.get('p50', 0):.2f} s, max {lat.get('max', 0):.2f} s")
    for example in by["harmed_examples"][:5]:
        print(f"  harmed: {example}")
    print("slowest calls:")
    for slow in report["slowest"][:5]:
        print(f"  {slow['seconds']:>7.2f} s  {slow['family']} [{slow['label']}] {slow['method']} -> {slow['code']} "
              f"(started t={slow['started_at_s']} s)")
    if report["unavailable"]["first_at_s"] is not None:
        print(f"first UNAVAILABLE at t={report['unavailable']['first_at_s']:.1f} s; cases in flight then:")
        for label in report["unavailable"]["in_flight_then"][:40]:
            print(f"    {label}")
    seen: set[tuple[str, str, str]] = set()
    for failure in report["failures"]:
        key = (failure["family"], failure["code"], failure["detail"][:60])
        if key not in seen and failure["code"] != "UNAVAILABLE" and len(seen) < 15:
            seen.add(key)
            print(f"  failure: {failure['family']} [{failure['label']}] {failure['method']} -> "
                  f"{failure['code']}: {failure['detail'][:160]}")
    stats = report["stats"]
    print(f"stats: restart fields {stats['restart_fields']} growth {stats['restart_growth']}, "
          f"counter resets {stats['counter_resets'][:3]}, poll failures {stats['poll_failures']}")
    if report.get("stack_log_events"):
        print(f"stack log: {report['stack_log_events']}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_stack_arguments(parser)
    parser.add_argument("--requests", type=int, default=3000, help="fuzz cases to send (a few make 2 calls)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--bystanders", type=int, default=4, help="healthy greedy requests running throughout")
    parser.add_argument("--call-timeout", type=float, default=180.0,
                        help="safety deadline of calls without a deliberate one; hitting it is a failure")
    parser.add_argument("--idle-timeout", type=float, default=60.0)
    parser.add_argument("--only", default="", help="comma-separated case families (default: all)")
    parser.add_argument("--list-families", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list_families:
        print("\n".join(f"{name:<18} weight {weight}" for name, weight, _ in FAMILIES))
        return 0
    try:
        stack = open_stack(args)
    except (RuntimeError, TimeoutError) as error:
        print(f"no stack to fuzz: {error}", file=sys.stderr)
        return 2
    args.target = stack.target
    try:
        report = asyncio.run(fuzz(args, stack.target))
    except grpc.aio.AioRpcError as error:
        print(f"the stack failed before fuzzing started: {error.code().name} {error.details()}", file=sys.stderr)
        return 2
    finally:
        # The events with which the launcher, scheduler and worker report a fault, as they appear in the log.
        events = stack.log_events([f'"event": "{name}"' for name in (
            "restarting", "keeps_failing", "gateway_exited", "worker_lost", "step_timed_out", "engine_loop_failed",
            "step_failed", "sequence_failed")] + ["Traceback"])
        code = stack.stop()
        if code is not None:
            print(f"stopped the launched stack (exit status {code})")
    report["stack_log_events"] = events
    report["idle_timeout_s"] = args.idle_timeout
    report["checks"] = acceptance(report)
    print_summary(report)
    report["passed"] = print_checks(report["checks"])
    write_report(args.out, report)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
