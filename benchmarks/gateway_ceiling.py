"""How many generated tokens per second one gateway process passes on, in front of a scheduler that answers at once.

    python benchmarks/gateway_ceiling.py --tokenizer DIR [--concurrency 256] [--client-processes 4]
                                         [--path session|submit] [--step-ms 0] [--gateways 1]

A stand-in scheduler (this script with --serve-scheduler, its own process) stands for the scheduler; the real
gateway (`python -m services.gateway`, its own process) sits in front; client processes (benchmarks/loadgen.py)
keep `--concurrency` requests in flight over --client-channels connections each. The report: tokens/s through
the gateway, the CPUs each process used, and the gateway's CPU time per token. --gateways N starts N gateway
processes on the one port, as `inflight serve --gateway-processes N` does.

--path session (the default, what an untraced gateway uses): the stand-in serves the Session stream as the
scheduler does, one "step" at a time: every --step-ms (0: as soon as the last step's message is written) each
live request gets one token, and the step's tokens for every request go out in one SessionEvents message.
--path submit: its ModelInfo offers no sessions, so the gateway makes one Submit call per request (what a
traced gateway does) and the stand-in streams each request's tokens as fast as gRPC takes them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc  # noqa: E402
import psutil  # noqa: E402
from grpc_health.v1 import health, health_pb2, health_pb2_grpc  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from benchmarks.loadgen import run_workload_in_processes  # noqa: E402
from benchmarks.workload import PromptMaker, Workload, fixed_lengths  # noqa: E402
from inflight.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc  # noqa: E402
from tests.stack import free_port, health_status  # noqa: E402


class StandInScheduler(scheduler_pb2_grpc.SchedulerServicer):
    """Answers every request with max_new_tokens tokens (a token id that decodes to text), at once or by steps."""

    def __init__(self, sessions: bool, step_seconds: float) -> None:
        self.sessions = sessions
        self.step_seconds = step_seconds

    async def Submit(self, request, context):  # type: ignore[no-untyped-def]
        for index in range(request.max_new_tokens):
            last = index == request.max_new_tokens - 1
            yield scheduler_pb2.TokenEvent(token_ids=(504 + index % 64,),
                                           finish_reason=common_pb2.FINISH_REASON_LENGTH if last else 0)

    async def Session(self, request_iterator, context):  # type: ignore[no-untyped-def]
        live: dict[tuple[str, str], list[int]] = {}  # (tenant, id) -> [tokens sent, tokens to send]
        arrived = asyncio.Event()

        async def read() -> None:
            async for message in request_iterator:
                if message.HasField("submit"):
                    submit = message.submit
                    live[(submit.tenant, submit.request_id)] = [0, submit.max_new_tokens]
                else:
                    live.pop((message.abort.tenant, message.abort.request_id), None)
                arrived.set()

        reader = asyncio.get_running_loop().create_task(read())
        try:
            while not reader.done() or live:
                if not live:
                    arrived.clear()
                    await arrived.wait()
                    continue
                events = scheduler_pb2.SessionEvents()
                for (tenant, request_id), progress in list(live.items()):
                    progress[0] += 1
                    last = progress[0] == progress[1]
                    events.events.add(tenant=tenant, request_id=request_id, event=scheduler_pb2.TokenEvent(
                        token_ids=(504 + progress[0] % 64,),
                        finish_reason=common_pb2.FINISH_REASON_LENGTH if last else 0))
                    if last:
                        del live[(tenant, request_id)]
                yield events
                await asyncio.sleep(self.step_seconds)
        finally:
            reader.cancel()

    async def Abort(self, request, context):  # type: ignore[no-untyped-def]
        return scheduler_pb2.SchedulerAbortResponse(found=False)

    async def GetStats(self, request, context):  # type: ignore[no-untyped-def]
        return common_pb2.Stats(kv_blocks_total=1, kv_blocks_free=1)

    async def GetModelInfo(self, request, context):  # type: ignore[no-untyped-def]
        return scheduler_pb2.ModelInfo(model_name="stand-in", vocab_size=49152, max_model_len=8192,
                                       eos_token_ids=[2], tp_size=1, engine="stand-in", device="cpu",
                                       instance_id="stand-in", sessions=self.sessions)


async def serve_scheduler(address: str, sessions: bool, step_seconds: float) -> None:
    server = grpc.aio.server()
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(StandInScheduler(sessions, step_seconds), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await health_servicer.set("inflight.v1.Scheduler", health_pb2.HealthCheckResponse.SERVING)
    server.add_insecure_port(address)
    await server.start()
    await server.wait_for_termination()


def wait_serving(gateway: subprocess.Popen, port: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert gateway.poll() is None, f"the gateway exited with {gateway.returncode}"
        try:
            if health_status(port) == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the gateway on port {port} is not serving")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", help="folder with tokenizer.json (the gateway's and the prompts')")
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--requests", type=int, default=1024)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--client-processes", type=int, default=4)
    parser.add_argument("--path", choices=("session", "submit"), default="session")
    parser.add_argument("--gateways", type=int, default=1, help="gateway processes sharing the port")
    parser.add_argument("--client-channels", type=int, default=4, help="connections of each client process")
    parser.add_argument("--step-ms", type=float, default=0.0, help="the stand-in's time per step (session path)")
    parser.add_argument("--serve-scheduler", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_scheduler:
        asyncio.run(serve_scheduler(args.serve_scheduler, args.path == "session", args.step_ms / 1000))
        return
    socket = f"unix://{tempfile.mkdtemp(prefix='gateway-ceiling-')}/scheduler.sock"
    port = free_port()
    scheduler = subprocess.Popen([sys.executable, __file__, "--serve-scheduler", socket, "--path", args.path,
                                  "--step-ms", str(args.step_ms)])
    gateways = [subprocess.Popen([sys.executable, "-m", "services.gateway", "--model", args.tokenizer, "--scheduler",
                                  socket, "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
                                  "--max-inflight-per-client", str(10 * args.concurrency),
                                  *(["--share-port"] if args.gateways > 1 else [])])
                for _ in range(args.gateways)]
    try:
        address = f"127.0.0.1:{port}"
        for gateway in gateways:
            wait_serving(gateway, port)
        maker = PromptMaker(Tokenizer.from_file(str(Path(args.tokenizer) / "tokenizer.json")), seed=0)
        workload = Workload("ceiling", fixed_lengths(maker, args.requests, 64, args.output_tokens),
                            concurrency=args.concurrency)
        run_workload_in_processes(address, Workload("warmup", workload.requests[:64], concurrency=16), 1)
        processes = {**{f"gateway-{i}": psutil.Process(g.pid) for i, g in enumerate(gateways)},
                     "scheduler stand-in": psutil.Process(scheduler.pid)}
        before = {name: sum(p.cpu_times()[:2]) for name, p in processes.items()}
        records, duration = run_workload_in_processes(address, workload, args.client_processes, args.client_channels)
        cpus = {name: round((sum(p.cpu_times()[:2]) - before[name]) / duration, 2) for name, p in processes.items()}
        cpus["gateway"] = round(sum(v for name, v in cpus.items() if name.startswith("gateway-")), 2)
        assert all(r.ok for r in records), [r.error for r in records if not r.ok][:3]
        tokens = sum(r.output_tokens for r in records)
        print(json.dumps({"path": args.path, "step_ms": args.step_ms, "gateways": args.gateways,
                          "concurrency": args.concurrency, "client_processes": args.client_processes,
                          "client_channels": args.client_channels,
                          "tokens_per_s": round(tokens / duration), "cpus": cpus,
                          "gateway_us_per_token": round(cpus["gateway"] * 1e6 / (tokens / duration), 1)}))
    finally:
        for process in (*gateways, scheduler):
            process.terminate()
            process.wait(timeout=30)


if __name__ == "__main__":
    main()
