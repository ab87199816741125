"""The gateway process: `python -m services.gateway --model DIR --scheduler ADDR --port 50051`."""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from inflight.log import configure_logging
from inflight.v1 import generation_pb2, generation_pb2_grpc
from services.gateway.admin import AdminService
from services.gateway.auth import AuthInterceptor, Authenticator, load_tokens
from services.gateway.config import GatewayConfig
from services.gateway.generation import GenerationService
from services.gateway.metrics import GatewayMetrics
from services.gateway.scheduler_client import SchedulerClient
from services.text.codec import TextCodec

PUBLIC_SERVICES = [
    generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name,
    generation_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
]
SERVER_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 8 * 2**20),
]


def server_credentials(config: GatewayConfig) -> grpc.ServerCredentials | None:
    if not config.tls_cert:
        return None
    key, cert = Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes()
    client_ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


async def poll_stats(scheduler: SchedulerClient, metrics: GatewayMetrics) -> None:
    from inflight.v1 import common_pb2

    while True:
        try:
            metrics.observe_stats(await scheduler.stub.GetStats(common_pb2.GetStatsRequest(), timeout=2))
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(1.0)


async def serve(config: GatewayConfig) -> None:
    log = configure_logging("gateway", config.log_level)
    log.info("gateway_starting", config=str(config))
    codec = TextCodec(Path(config.model))
    scheduler = SchedulerClient(config.scheduler)
    metrics = GatewayMetrics()
    authenticator = None
    interceptors = []
    if config.auth_tokens_file:
        exempt = [p for p in config.auth_exempt.split(",") if p]
        authenticator = Authenticator(load_tokens(Path(config.auth_tokens_file)), exempt)
        interceptors.append(AuthInterceptor(authenticator))
    server = grpc.aio.server(interceptors=interceptors, options=SERVER_OPTIONS)
    generation = GenerationService(codec, scheduler, metrics, authenticator, config.max_inflight_per_client)
    generation_pb2_grpc.add_GenerationServicer_to_server(generation, server)
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
    credentials = server_credentials(config)
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if bound == 0:
        raise SystemExit(f"gateway: cannot listen on {address}")
    if config.metrics_port:
        start_http_server(config.metrics_port, registry=metrics.registry)
    await server.start()
    log.info("gateway_listening", address=address, tls=credentials is not None, auth=authenticator is not None,
             metrics_port=config.metrics_port)
    tasks = [asyncio.create_task(scheduler.watch(on_ready_change)), asyncio.create_task(poll_stats(scheduler, metrics))]
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("gateway_draining", in_flight=len(generation.in_flight), drain_seconds=config.drain_seconds)
    for task in tasks:
        task.cancel()
    await health_servicer.enter_graceful_shutdown()
    generation.draining = True  # new generations get UNAVAILABLE; health answers NOT_SERVING meanwhile
    deadline = asyncio.get_running_loop().time() + config.drain_seconds
    while generation.in_flight and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.1)
    await server.stop(grace=1.0)
    await scheduler.close()
    log.info("gateway_stopped")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="inflight gateway", description=__doc__)
    GatewayConfig.add_arguments(parser)
    asyncio.run(serve(GatewayConfig.from_args(parser.parse_args(argv))))


if __name__ == "__main__":
    main()
