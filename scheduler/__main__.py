"""The scheduler process: `python -m scheduler --worker ADDR --listen ADDR`."""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from inflight.connection import KeepalivePolicy
from inflight.log import configure_logging
from inflight.process import die_with_parent
from inflight.tracing import HEALTH_AND_REFLECTION, Tracing, start_tracing
from inflight.v1 import scheduler_pb2_grpc
from scheduler.config import SchedulerConfig
from scheduler.engine_loop import EngineLoop
from scheduler.service import SchedulerService

if TYPE_CHECKING:
    from scheduler.tracing import SchedulerTracing

SERVICE_NAME = "inflight.v1.Scheduler"
TRACED_AS = "inflight-scheduler"
# The gateway polls stats every second: spans for those would bury the requests'.
UNTRACED = (*HEALTH_AND_REFLECTION, f"/{SERVICE_NAME}/GetStats")


async def serve(config: SchedulerConfig) -> None:
    if config.exit_with_parent:
        die_with_parent(signal.SIGTERM)
    log = configure_logging("scheduler", config.log_level)
    log.info("scheduler_starting", config=str(config))
    tracing = start_tracing(TRACED_AS, config.otlp_traces_endpoint, UNTRACED)
    server = grpc.aio.server(interceptors=tracing.server_interceptors,
                             options=KeepalivePolicy(config.keepalive_seconds).server_options())
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)

    def on_ready_change(ready: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            asyncio.get_running_loop().create_task(health_servicer.set(name, status))

    on_ready_change(False)
    loop = EngineLoop(config, on_ready_change, scheduler_tracing(tracing))
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(SchedulerService(loop), server)
    if server.add_insecure_port(config.listen) == 0:
        raise SystemExit(f"scheduler: cannot listen on {config.listen}")
    await server.start()
    log.info("scheduler_listening", listen=config.listen, worker=config.worker)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    runner = asyncio.create_task(loop.run())
    runner.add_done_callback(lambda _: stop.set())
    await stop.wait()
    crashed = runner.done() and not runner.cancelled() and runner.exception() is not None
    if crashed:
        log.error("engine_loop_crashed", error=repr(runner.exception()))
    log.info("scheduler_stopping")
    runner.cancel()
    await server.stop(grace=2.0)
    await loop.link.close()
    tracing.shutdown()
    if crashed:
        raise SystemExit(1)


def scheduler_tracing(tracing: Tracing) -> SchedulerTracing | None:
    if tracing.tracer is None:
        return None
    from scheduler.tracing import SchedulerTracing  # needs opentelemetry, installed when tracing is on

    return SchedulerTracing(tracing.tracer)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="inflight scheduler", description=__doc__)
    SchedulerConfig.add_arguments(parser)
    asyncio.run(serve(SchedulerConfig.from_args(parser.parse_args(argv))))


if __name__ == "__main__":
    main()
