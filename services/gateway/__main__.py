"""The gateway process: `python -m services.gateway --model DIR --scheduler ADDR --port 50051`."""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from inflight.log import configure_logging
from inflight.v1 import generation_pb2, generation_pb2_grpc
from services.gateway.admin import AdminService
from services.gateway.config import GatewayConfig
from services.gateway.generation import GenerationService
from services.gateway.scheduler_client import SchedulerClient
from services.text.codec import TextCodec

PUBLIC_SERVICES = [
    generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name,
    generation_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
]


async def serve(config: GatewayConfig) -> None:
    log = configure_logging("gateway", config.log_level)
    log.info("gateway_starting", config=str(config))
    codec = TextCodec(Path(config.model))
    scheduler = SchedulerClient(config.scheduler)
    server = grpc.aio.server()
    generation_pb2_grpc.add_GenerationServicer_to_server(GenerationService(codec, scheduler), server)
    generation_pb2_grpc.add_AdminServicer_to_server(AdminService(scheduler), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*PUBLIC_SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME], server)

    def on_ready_change(ready: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *PUBLIC_SERVICES):
            asyncio.get_running_loop().create_task(health_servicer.set(name, status))

    on_ready_change(False)
    address = f"{config.host}:{config.port}"
    if server.add_insecure_port(address) == 0:
        raise SystemExit(f"gateway: cannot listen on {address}")
    await server.start()
    log.info("gateway_listening", address=address)
    watcher = asyncio.create_task(scheduler.watch(on_ready_change))
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("gateway_stopping")
    await health_servicer.enter_graceful_shutdown()
    watcher.cancel()
    await server.stop(grace=5.0)
    await scheduler.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="inflight gateway", description=__doc__)
    GatewayConfig.add_arguments(parser)
    asyncio.run(serve(GatewayConfig.from_args(parser.parse_args(argv))))


if __name__ == "__main__":
    main()
