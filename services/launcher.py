"""`inflight serve`: the whole stack on one host — an MPI worker group, the scheduler, the gateway.

The launcher prepares the model, starts the three parts as separate processes talking over
Unix sockets (the gateway listens on TCP), restarts the worker group if it dies, and on
SIGINT/SIGTERM stops everything in order, leaving no MPI rank behind.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from inflight.log import configure_logging
from inflight.model_config import ModelConfig, UnsupportedModel
from inflight.model_shapes import SHAPES
from inflight.model_store import DEFAULT_MODEL, resolve_model
from inflight.tracing import add_otlp_traces_endpoint
from scheduler.config import OVERLAP_MODES
from services.child_health import LivenessProbe, ServingWatch
from services.gateway.config import GatewayConfig
from worker.config import WorkerConfig


@dataclass(frozen=True)
class ServeConfig:
    model: str
    host: str
    port: int
    device: str
    dtype: str
    tp: int
    num_kv_blocks: int
    kv_cache_gb: float
    block_size: int
    max_num_batched_tokens: int
    max_num_seqs: int
    max_model_len: int
    policy: str
    tenant_weights: str
    no_prefix_caching: bool
    overlap: str  # overlap scheduling: on, off, or auto (on unless --device cpu); see scheduler/config.py
    steps_in_flight: int
    kv_event_history: int
    max_waiting_requests: int
    step_timeout: float
    step_timeout_per_token: float
    liveness_timeout: float
    keepalive_seconds: float
    cache_dir: str
    tokenizer: str
    mpiexec: str
    mpi_hosts: str
    cpu_threads: int
    batch_invariant: bool  # CUDA: a sequence's tokens independent of its batch (worker/torch_engine/invariant_matmul.py)
    peer_all_reduce: bool  # tp > 1 on CUDA: small all-reduces through GPU peer memory (worker/peer_all_reduce.py)
    peer_add_norm: bool    # with peer_all_reduce: all-reduce, residual add and RMSNorm in one kernel
    pdl: bool              # Hopper and later: Triton kernels launched as programmatic dependents
    pdl_max_rows: int
    profile_steps: str     # FIRST:LAST:FILE, for benchmarks: the worker's device timeline over those steps
    profile_tracer: str
    log_level: str
    otlp_traces_endpoint: str  # both the gateway and the scheduler trace to it
    gateway_processes: int     # gateway processes sharing the port (SO_REUSEPORT), each with its own session
    gateway: GatewayConfig

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--model", default=DEFAULT_MODEL,
                            help=f"model folder, .gguf file, random:<shape>, or {DEFAULT_MODEL} (embedded)")
        parser.add_argument("--host", default="0.0.0.0")
        parser.add_argument("--port", type=int, default=50051)
        parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
        parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
        parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (mpiexec -n)")
        parser.add_argument("--num-kv-blocks", type=int, default=0, help="0: size from --kv-cache-gb")
        parser.add_argument("--kv-cache-gb", type=float, default=0.0)
        parser.add_argument("--block-size", type=int, default=16)
        parser.add_argument("--max-num-batched-tokens", type=int, default=1024)
        parser.add_argument("--max-num-seqs", type=int, default=128)
        parser.add_argument("--max-model-len", type=int, default=0)
        parser.add_argument("--policy", default="fcfs", choices=["fcfs", "priority", "fair"])
        parser.add_argument("--tenant-weights", default="", help='for --policy fair: "tenantA=2,tenantB=1"')
        parser.add_argument("--no-prefix-caching", action="store_true")
        parser.add_argument("--overlap", default="auto", choices=OVERLAP_MODES,
                            help="overlap scheduling: the scheduler plans step N+1 while step N runs (on), or after "
                                 "its result (off); auto: on unless --device cpu")
        parser.add_argument("--steps-in-flight", type=int, default=2,
                            help="with overlap, steps the scheduler sends ahead of their results (2 or more)")
        parser.add_argument("--kv-event-history", type=int, default=4096,
                            help="prefix-cache event batches kept for SubscribeKvEvents subscribers that resume")
        parser.add_argument("--cache-dir", default="", help="where converted models are kept")
        parser.add_argument("--tokenizer", default="",
                            help="folder with tokenizer.json for the gateway (default: the model's; "
                                 f"for random:<shape> models, {DEFAULT_MODEL}'s)")
        parser.add_argument("--mpiexec", default="", help="mpiexec to use (default: beside this Python, else PATH)")
        parser.add_argument("--cpu-threads", type=int, default=0,
                            help="on cpu, compute threads per rank (0: the host's usable CPUs shared by its ranks); "
                                 "set it when several stacks share one host")
        parser.add_argument("--batch-invariant", action="store_true",
                            help="on CUDA, compute each sequence the same whatever else is in its batch, so its "
                                 "greedy tokens in bfloat16 do not depend on the traffic beside it; slower projections")
        WorkerConfig.add_kernel_arguments(parser)
        parser.add_argument("--mpi-hosts", default="",
                            help="run the worker group's ranks across hosts: HOST[:SLOTS],... in rank order, this "
                                 "host first (rank 0 serves the scheduler here); given to mpiexec as -host. Every "
                                 "host needs the same paths (this Python, the model) and mpiexec's remote launch")
        parser.add_argument("--log-level", default="info")
        parser.add_argument("--max-waiting-requests", type=int, default=1024)
        parser.add_argument("--step-timeout", type=float, default=30.0,
                            help="seconds before an unfinished step marks the worker group hung and restarts it (0: never)")
        parser.add_argument("--step-timeout-per-token", type=float, default=0.05,
                            help="seconds added to --step-timeout per token in the step")
        parser.add_argument("--liveness-timeout", type=float, default=10.0,
                            help="seconds without any answer from the scheduler's or worker rank 0's health before "
                                 "that process (the whole worker group) is restarted (0: never)")
        parser.add_argument("--keepalive-seconds", type=float, default=20.0,
                            help="ping interval on the internal connections (each server accepts half of it)")
        add_otlp_traces_endpoint(parser)
        gateway = parser.add_argument_group("gateway")
        gateway.add_argument("--gateway-processes", type=int, default=0,
                             help="gateway processes on the one port (the kernel spreads client connections across "
                                  "them), for when one Python process cannot keep up with the tokens a GPU streams; "
                                  "0: 2 with --device cuda, else 1. Per-client and in-flight limits then hold per "
                                  "process, and /metrics (on --metrics-port) sums them all")
        GatewayConfig.add_arguments(gateway, include_model=False)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServeConfig:
        if args.gateway_processes < 0:
            raise SystemExit("inflight serve: --gateway-processes must be 0 (auto) or more")
        if args.gateway_processes > 1 and not args.port:
            raise SystemExit("inflight serve: --gateway-processes above 1 needs a fixed --port for them to share")
        if args.batch_invariant and args.device != "cuda":
            raise SystemExit("inflight serve: --batch-invariant needs --device cuda (its kernels are Triton's, on GPUs)")
        if not args.gateway_processes:  # auto: a GPU streams more tokens than one gateway process passes on
            args.gateway_processes = 2 if args.device == "cuda" and args.port else 1
        shared = ("model", "scheduler", "host", "port", "log_level", "keepalive_seconds", "exit_with_parent",
                  "share_port")
        gateway = GatewayConfig(model="", scheduler="", host=args.host, port=args.port, log_level=args.log_level,
                                keepalive_seconds=args.keepalive_seconds, exit_with_parent=True,
                                share_port=args.gateway_processes > 1,
                                **{name: getattr(args, name) for name in GatewayConfig.__dataclass_fields__
                                   if name not in shared})
        if not gateway.max_inflight_requests:
            # What the scheduler holds (its batch and its queue). Everything it holds is in flight at the
            # gateway too, so the gateway's cheap check sheds load before the scheduler would have to.
            held = args.max_waiting_requests + args.max_num_seqs
            gateway = dataclasses.replace(gateway, max_inflight_requests=held)
        own = {name: getattr(args, name) for name in cls.__dataclass_fields__ if name != "gateway"}
        return cls(**own, gateway=gateway)


def find_mpiexec(explicit: str) -> str:
    if explicit:
        return explicit
    beside_python = Path(sys.executable).parent / "mpiexec"
    found = str(beside_python) if beside_python.exists() else shutil.which("mpiexec")
    if not found:
        raise SystemExit("mpiexec not found: install the mpich wheel (pip install mpich) or an MPI")
    return found


class Stack:
    """The child processes of one `inflight serve`, each in its own process group."""

    def __init__(self, config: ServeConfig, model_path: str, tokenizer_path: str, runtime_dir: Path) -> None:
        self.config = config
        self.model_path = model_path
        self.tokenizer_path = tokenizer_path
        self.worker_address = f"unix://{runtime_dir}/worker.sock"
        self.scheduler_address = f"unix://{runtime_dir}/scheduler.sock"
        self.metrics_dir = runtime_dir / "gateway-metrics"  # several gateways' metric values, summed on export
        self.gateways = ["gateway"] + [f"gateway-{i}" for i in range(1, config.gateway_processes)]
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def _spawn(self, name: str, command: list[str], env: dict[str, str] | None = None) -> None:
        self.processes[name] = subprocess.Popen(command, start_new_session=True,
                                                env={**os.environ, **env} if env else None)

    def start_worker_group(self) -> None:
        c = self.config
        self._spawn("worker", [
            sys.executable, "-m", "inflight.process",  # mpiexec, dying with this launcher
            find_mpiexec(c.mpiexec), *(["-host", c.mpi_hosts] if c.mpi_hosts else []), "-n", str(c.tp),
            sys.executable, "-m", "worker",
            "--model", self.model_path, "--listen", self.worker_address, "--device", c.device, "--dtype", c.dtype,
            "--block-size", str(c.block_size), "--num-kv-blocks", str(c.num_kv_blocks),
            "--kv-cache-gb", str(c.kv_cache_gb), "--max-num-batched-tokens", str(c.max_num_batched_tokens),
            "--max-num-seqs", str(c.max_num_seqs), "--max-model-len", str(c.max_model_len),
            "--keepalive-seconds", str(c.keepalive_seconds), "--log-level", c.log_level,
            "--cpu-threads", str(c.cpu_threads), "--peer-all-reduce" if c.peer_all_reduce else "--no-peer-all-reduce",
            "--peer-add-norm" if c.peer_add_norm else "--no-peer-add-norm", "--pdl" if c.pdl else "--no-pdl",
            "--pdl-max-rows", str(c.pdl_max_rows), "--profile-steps", c.profile_steps,
            "--profile-tracer", c.profile_tracer,
            *(["--batch-invariant"] if c.batch_invariant else []),
        ])

    def start_scheduler(self) -> None:
        c = self.config
        self._spawn("scheduler", [
            sys.executable, "-m", "scheduler", "--worker", self.worker_address, "--listen", self.scheduler_address,
            "--policy", c.policy, "--tenant-weights", c.tenant_weights, "--log-level", c.log_level,
            "--max-waiting-requests", str(c.max_waiting_requests), "--step-timeout", str(c.step_timeout),
            "--step-timeout-per-token", str(c.step_timeout_per_token), "--keepalive-seconds", str(c.keepalive_seconds),
            "--kv-event-history", str(c.kv_event_history),
            "--exit-with-parent", *(["--no-prefix-caching"] if c.no_prefix_caching else []),
            "--overlap", c.overlap, "--steps-in-flight", str(c.steps_in_flight),
            *(["--otlp-traces-endpoint", c.otlp_traces_endpoint] if c.otlp_traces_endpoint else []),
        ])

    def start(self) -> None:
        self.start_worker_group()
        self.start_scheduler()
        self.start_gateways()

    def start_gateways(self) -> None:
        """One gateway, or several on the shared port; the first alone serves --metrics-port (for them all)."""
        c = self.config
        env = None
        if len(self.gateways) > 1:
            self.metrics_dir.mkdir()
            env = {"PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir)}
        for index, name in enumerate(self.gateways):
            gateway = c.gateway if index == 0 else dataclasses.replace(c.gateway, metrics_port=0)
            self._spawn(name, [
                sys.executable, "-m", "services.gateway", "--model", self.tokenizer_path, "--scheduler",
                self.scheduler_address, "--host", c.host, "--port", str(c.port), "--log-level", c.log_level,
                *gateway.to_flags(),
            ], env)

    def exited(self) -> dict[str, int]:
        return {name: code for name, p in self.processes.items() if (code := p.poll()) is not None}

    def stop_one(self, name: str, timeout: float) -> None:
        process = self.processes[name]
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            self.signal_group(name, sig)  # the whole group: mpiexec, its proxies and every rank
            try:
                process.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        self.signal_group(name, signal.SIGKILL)  # ranks that outlived mpiexec in the same group

    def signal_group(self, name: str, sig: signal.Signals) -> None:
        """The signal to every process of a child's group (it may be gone already)."""
        try:
            os.killpg(self.processes[name].pid, sig)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        started = [name for name in self.gateways if name in self.processes]
        for name in started:  # they drain side by side
            self.signal_group(name, signal.SIGTERM)
        drain = self.config.gateway.drain_seconds + 5
        for name in started:
            self.stop_one(name, drain)
        for name in ("scheduler", "worker"):
            if name in self.processes:
                self.stop_one(name, 3.0)


MAX_FAILED_STARTS = 3  # replaced worker groups in a row that never came up: the stack exits 1


class RestartBudget:
    """At most `limit` restarts within `window` seconds: past that, restarting is not helping."""

    def __init__(self, limit: int = 5, window: float = 60.0) -> None:
        self.limit, self.window = limit, window
        self._times: list[float] = []

    def spend(self) -> bool:
        now = time.monotonic()
        self._times = [t for t in self._times if now - t < self.window] + [now]
        return len(self._times) <= self.limit


def check_tensor_parallel(model_path: str, tp: int) -> None:
    """Fail before starting anything if the model's heads cannot be split across tp ranks."""
    if model_path.startswith("random:"):
        heads = int(SHAPES[model_path.removeprefix("random:")]["num_attention_heads"])  # type: ignore[call-overload]
    else:
        try:
            heads = ModelConfig.load(Path(model_path)).num_attention_heads
        except UnsupportedModel as error:
            raise SystemExit(f"inflight serve: {model_path}: {error}") from None
    if tp < 1 or heads % tp:
        raise SystemExit(f"inflight serve: --tp {tp}: {heads} attention heads cannot be split across tp={tp} ranks")


def check_mpi_hosts(mpi_hosts: str) -> None:
    """Rank 0 goes to the first host, and it must be this one: the scheduler reaches it on a local socket."""
    if not mpi_hosts:
        return
    first = mpi_hosts.split(",")[0].split(":")[0]
    try:
        with socket.socket() as probe:
            probe.bind((socket.gethostbyname(first), 0))  # only this host's own addresses can be bound
        is_local = True
    except OSError:
        is_local = first in (socket.gethostname(), socket.getfqdn())
    if not is_local:
        raise SystemExit(f"inflight serve: --mpi-hosts {mpi_hosts}: the first host ({first}) must be this one, "
                         f"{socket.gethostname()}, which runs rank 0")


def check_port_free(host: str, port: int) -> None:
    """Fail before starting anything if something already listens on the gateway's port (another stack, say):
    gateways that share a port would otherwise bind beside it, and the kernel would split clients between them."""
    if not port:
        return
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: a closed port's TIME_WAIT is free
            probe.bind(address)
    except OSError as error:
        raise SystemExit(f"inflight serve: cannot listen on {host}:{port}: {error.strerror or error}") from None


def serve(config: ServeConfig) -> int:
    log = configure_logging("launcher", config.log_level)
    check_port_free(config.host, config.port)
    cache_dir = Path(config.cache_dir) if config.cache_dir else None
    if config.model.startswith("random:"):
        model_path = config.model
    else:
        model_path = str(resolve_model(config.model, cache_dir))
    tokenizer_path = str(resolve_model(config.tokenizer, cache_dir)) if config.tokenizer else (
        str(resolve_model(DEFAULT_MODEL, cache_dir)) if config.model.startswith("random:") else model_path)
    check_tensor_parallel(model_path, config.tp)
    check_mpi_hosts(config.mpi_hosts)
    log.info("launcher_starting", model=model_path, port=config.port, tp=config.tp, device=config.device)
    stopping = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    with tempfile.TemporaryDirectory(prefix="inflight-") as runtime_dir:
        stack = Stack(config, model_path, tokenizer_path, Path(runtime_dir))
        stack.start()
        try:
            return _supervise(stack, config, log, lambda: stopping)
        finally:
            log.info("launcher_stopping")
            stack.stop()
            log.info("launcher_stopped")


def _supervise(stack: Stack, config: ServeConfig, log: structlog.stdlib.BoundLogger,
               stopping: Callable[[], bool]) -> int:
    """Restart a dead or frozen worker group or scheduler; a dead gateway ends the stack (exit 1).

    The gateway is the stack's face: if it (or any of several) dies, whatever supervises `inflight serve`
    (systemd, Kubernetes) must see the whole stack exit and start it again. So must a worker group that
    cannot come up (the first one, or MAX_FAILED_STARTS replacements in a row): restarting it here would
    leave a stack that answers UNAVAILABLE for ever.
    """
    budgets = {"worker": RestartBudget(), "scheduler": RestartBudget()}
    probes = {"worker": LivenessProbe(stack.worker_address, config.liveness_timeout),
              "scheduler": LivenessProbe(stack.scheduler_address, config.liveness_timeout)}
    serving = ServingWatch(stack.scheduler_address)
    announced = False
    ready_before_group = 0  # serving.times_ready when the running worker group started
    failed_starts = 0  # groups in a row replaced before they came up
    try:
        while not stopping():
            exited = stack.exited()
            gone = [name for name in stack.gateways if name in exited]
            if gone:
                log.error("gateway_exited", process=gone[0], exit_code=exited[gone[0]])
                return 1
            if not announced and serving.times_ready:
                announced = True
                for probe in probes.values():  # both have answered: the scheduler, and the worker's warmup
                    probe.answered()
                log.info("inflight_ready", port=config.port)
                print(f"inflight is serving on port {config.port}", file=sys.stderr, flush=True)
            if "worker" in exited and not announced:
                log.error("worker_group_failed_to_start", exit_code=exited["worker"])
                return 1
            for name, probe in probes.items():
                frozen = name not in exited and probe.frozen()
                if name not in exited and not frozen:
                    continue
                if name == "worker":
                    failed_starts = 0 if serving.times_ready > ready_before_group else failed_starts + 1
                    if failed_starts >= MAX_FAILED_STARTS:  # each start may take minutes: the budget misses it
                        log.error("worker_group_keeps_failing_to_start", attempts=failed_starts,
                                  exit_code=exited.get(name))
                        return 1
                if not budgets[name].spend():
                    log.error("keeps_failing", process=name, exit_code=exited.get(name))
                    return 1
                log.error("restarting", process=name, exit_code=exited.get(name), frozen=frozen)
                stack.stop_one(name, 0.5 if frozen else 1.0)
                probe.reset()
                if name == "worker":
                    ready_before_group = serving.times_ready
                    stack.start_worker_group()
                else:
                    stack.start_scheduler()
            time.sleep(0.2)
        return 0
    finally:
        serving.close()
