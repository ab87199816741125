"""The stack under test for fuzz.py and flood.py: launch one or attach to one, wait for health, call it with raw
bytes, find its processes and their memory, watch its Stats (restarts, counter resets, draining), stop it; plus
the report helpers both scripts share (percentiles, acceptance checks, the JSON report)."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inflight.v1 import common_pb2, generation_pb2 as gen, generation_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
TENANT_KEY = "x-tenant-id"
GENERATION = "/inflight.v1.Generation/"
RESPONSE_TYPES: dict[str, type] = {
    "Generate": gen.GenerateResponse, "Complete": gen.CompleteResponse, "Abort": gen.AbortResponse,
    "ModelInfo": gen.ModelInfoResponse, "Tokenize": gen.TokenizeResponse, "Detokenize": gen.DetokenizeResponse,
}


# --- Launch, attach, health, raw calls ------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def inflight_command() -> list[str]:
    script = Path(sys.executable).parent / "inflight"
    return [str(script)] if script.exists() else [sys.executable, "-m", "services.cli"]


def health_serving(target: str, timeout: float = 2.0) -> bool:
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING


def tenant_metadata(tenant: str) -> tuple[tuple[str, str], ...]:
    return ((TENANT_KEY, tenant),) if tenant else ()


def raw_method(channel: grpc.Channel | grpc.aio.Channel, name: str) -> Any:
    """Generation method `name` without a request serializer: requests go out as the bytes given."""
    factory = channel.unary_stream if name == "Generate" else channel.unary_unary
    return factory(GENERATION + name, request_serializer=None, response_deserializer=RESPONSE_TYPES[name].FromString)


class RawCaller:
    """Every raw_method on one asyncio channel, called with a tenant."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.methods = {name: raw_method(channel, name) for name in RESPONSE_TYPES}

    def __call__(self, method: str, payload: bytes, timeout: float, tenant: str) -> Any:
        return self.methods[method](payload, timeout=timeout, metadata=tenant_metadata(tenant))


# --- The stack's processes: tree, resident memory, role names -------------------------------------

def children_map() -> dict[int, list[int]]:
    """Parent pid -> child pids, from /proc/*/stat."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children[ppid].append(int(entry))
    return children


def process_tree(root: int) -> list[int]:
    """root and all its descendants that are alive now."""
    children, found, todo = children_map(), [], [root]
    while todo:
        pid = todo.pop()
        if Path(f"/proc/{pid}").exists():
            found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def rss_bytes(pid: int) -> int | None:
    """VmRSS of pid; None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return 0  # a zombie has no VmRSS line


PROCESS_ROLES = (("services.gateway", "gateway"), ("-m scheduler", "scheduler"), ("-m worker", "worker"),
                 (" serve", "launcher"))  # (text in the command line, role), first match wins


def process_label(pid: int) -> str:
    """A short role name for one of the stack's processes."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return f"gone[{pid}]"
    program = Path(argv[0].decode(errors="replace")).name
    if program in ("mpiexec", "mpirun", "hydra_pmi_proxy"):
        return f"{program}[{pid}]"
    text = " ".join(a.decode(errors="replace") for a in argv if a)
    role = next((role for needle, role in PROCESS_ROLES if needle in text), program)
    return f"{role}[{pid}]"


# --- The stack ------------------------------------------------------------------------------------

class Stack:
    """The stack under test: one this script launched (and stops at the end), or one already serving."""

    def __init__(self, target: str, process: subprocess.Popen[bytes] | None = None,
                 log_path: Path | None = None) -> None:
        self.target, self.process, self.log_path = target, process, log_path

    @classmethod
    def launch(cls, serve_args: str, port: int, log_path: Path) -> Stack:
        command = [*inflight_command(), "serve", "--host", "127.0.0.1", "--port", str(port), *shlex.split(serve_args)]
        print(f"launching: {shlex.join(command)}  (log: {log_path})", flush=True)
        with open(log_path, "wb") as log:
            process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return cls(f"127.0.0.1:{port}", process, log_path)

    @property
    def root_pid(self) -> int | None:
        return self.process.pid if self.process else None

    def wait_serving(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"inflight serve exited with {self.process.returncode}; see {self.log_path}")
            if health_serving(self.target):
                return
            time.sleep(0.5)
        raise TimeoutError(f"{self.target} was not SERVING after {timeout:.0f} s")

    def log_events(self, names: Sequence[str]) -> dict[str, int]:
        """How often each log event (or text) appears in the launched stack's log."""
        if self.log_path is None or not self.log_path.exists():
            return {}
        text = self.log_path.read_text(errors="replace")
        return {name: text.count(name) for name in names}

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM the launcher's process group; SIGKILL whatever of its tree is left after timeout."""
        if self.process is None:
            return None
        tree = process_tree(self.process.pid)
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        for pid in tree[1:]:  # children run in their own sessions: kill any left behind, group by group
            if Path(f"/proc/{pid}").exists():
                try:
                    os.killpg(os.getpgid(pid), signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        return self.process.returncode


def open_stack(args: argparse.Namespace) -> Stack:
    """The stack add_stack_arguments describes, SERVING (a launched one is stopped again if it never is)."""
    if not args.launch:
        stack = Stack(args.target)
        stack.wait_serving(args.ready_timeout)
        return stack
    port = args.port or free_port()
    log_path = Path(args.serve_log or f"/tmp/inflight-{Path(sys.argv[0]).stem}-{port}.log")
    stack = Stack.launch(args.serve_args, port, log_path)
    try:
        stack.wait_serving(args.ready_timeout)
    except BaseException:
        stack.stop()
        raise
    return stack


def add_stack_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="127.0.0.1:50051", help="a stack already serving (host:port)")
    parser.add_argument("--launch", action="store_true", help="start `inflight serve` here and stop it at the end")
    parser.add_argument("--serve-args", default="", help='extra `inflight serve` flags with --launch, e.g. "--num-kv-blocks 256"')
    parser.add_argument("--port", type=int, default=0, help="port for --launch (default: a free one)")
    parser.add_argument("--serve-log", default="", help="log file of the launched stack")
    parser.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for health SERVING")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="", help="write the JSON report here")


# --- Scheduler statistics and draining ------------------------------------------------------------

def stats_dict(stats: common_pb2.Stats) -> dict[str, int]:
    return {f.name: int(getattr(stats, f.name)) for f in common_pb2.Stats.DESCRIPTOR.fields}


MONOTONIC_COUNTERS = ("steps_total", "prompt_tokens_total", "generated_tokens_total", "batched_sequences_total")


def restart_fields() -> list[str]:
    """Stats fields that count losses (worker_restarts, worker_group_restarts, scheduler_restarts, ...)."""
    return [name for name in common_pb2.Stats.DESCRIPTOR.fields_by_name if name.endswith("_restarts")]


@dataclass
class StatsWatch:
    """GetStats once a second: restart counters, counters that go backwards (a new scheduler planner)."""

    first: dict[str, int] = field(default_factory=dict)
    last: dict[str, int] = field(default_factory=dict)
    counter_resets: list[str] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)
    polls: int = 0

    def observe(self, stats: dict[str, int], at: float) -> None:
        self.polls += 1
        if not self.first:
            self.first = stats
        for name in MONOTONIC_COUNTERS:
            if self.last and stats.get(name, 0) < self.last.get(name, 0):
                self.counter_resets.append(f"{name} {self.last[name]} -> {stats[name]} at t={at:.1f}s")
        self.last = stats

    def restart_growth(self) -> dict[str, int]:
        return {name: self.last.get(name, 0) - self.first.get(name, 0) for name in restart_fields()}

    async def run(self, admin: generation_pb2_grpc.AdminStub, done: asyncio.Event, t0: float) -> None:
        while not done.is_set():
            try:
                stats = await admin.GetStats(common_pb2.GetStatsRequest(), timeout=5)
                self.observe(stats_dict(stats), time.perf_counter() - t0)
            except grpc.aio.AioRpcError as error:
                self.failures[error.code().name] += 1
            try:
                await asyncio.wait_for(done.wait(), 1.0)
            except asyncio.TimeoutError:
                pass


async def wait_idle(admin: generation_pb2_grpc.AdminStub, timeout: float) -> tuple[bool, dict[str, int] | str]:
    """Poll GetStats until nothing runs or waits and every KV block is free (kv_blocks_total 0, a scheduler
    without its worker group, does not count); returns (idle?, the last stats or error)."""
    deadline = time.monotonic() + timeout
    last: dict[str, int] | str = "no answer"
    while True:
        try:
            stats = await admin.GetStats(common_pb2.GetStatsRequest(), timeout=5)
            last = stats_dict(stats)
            if (stats.requests_running == 0 and stats.requests_waiting == 0 and stats.kv_blocks_total > 0
                    and stats.kv_blocks_free == stats.kv_blocks_total):
                return True, last
        except grpc.aio.AioRpcError as error:
            last = f"GetStats failed: {error.code().name}"
        if time.monotonic() > deadline:
            return False, last
        await asyncio.sleep(0.5)


async def drained(target: str, timeout: float) -> tuple[bool, dict[str, int] | str]:
    """wait_idle on a channel of its own."""
    async with grpc.aio.insecure_channel(target) as channel:
        return await wait_idle(generation_pb2_grpc.AdminStub(channel), timeout)


def idle_text(final: dict[str, int] | str) -> str:
    """wait_idle's last answer in words."""
    if isinstance(final, str):
        return final
    return (f"running {final['requests_running']}, waiting {final['requests_waiting']}, "
            f"free {final['kv_blocks_free']}/{final['kv_blocks_total']} blocks")


# --- Reports and acceptance checks ----------------------------------------------------------------

def percentiles(values: Sequence[float]) -> dict[str, float | int]:
    """count, p50, p90, p99, max (nearest rank), in seconds."""
    ordered = sorted(values)
    if not ordered:
        return {"count": 0}

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    return {"count": len(ordered), "p50": rank(0.50), "p90": rank(0.90), "p99": rank(0.99), "max": ordered[-1]}


def check(passed: bool, detail: str, skipped: bool = False) -> dict[str, Any]:
    """One acceptance check as the JSON report holds it."""
    return {"passed": passed, "detail": detail, **({"skipped": True} if skipped else {})}


def print_checks(checks: dict[str, dict[str, Any]]) -> bool:
    """Print each check; True when every one passed or was skipped."""
    print("\nacceptance checks:")
    for name, result in checks.items():
        mark = "PASS" if result["passed"] else ("SKIP" if result.get("skipped") else "FAIL")
        print(f"  [{mark}] {name}: {result['detail']}")
    return all(c["passed"] or c.get("skipped") for c in checks.values())


def write_report(path: str, report: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=2, default=str, allow_nan=True) + "\n")
        print(f"report: {path}")
