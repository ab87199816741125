"""The gateway process: `python -m services.gateway --model DIR --scheduler ADDR --port 50051`."""

from __future__ import annotations

import argparse
import asyncio
import signal
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from inflight.connection import KeepalivePolicy, public_server_options
from inflight.log import configure_logging
from inflight.process import die_with_parent
from inflight.tracing import HEALTH_AND_REFLECTION, Tracing, start_tracing
from inflight.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from services.gateway.admin import AdminService
from services.gateway.auth import AuthInterceptor, Authenticator, load_tokens
from services.gateway.config import GatewayConfig
from services.gateway.generation import AdmissionLimits, GenerationService
from services.gateway.malformed import MalformedRequestInterceptor
from services.gateway.metrics import GatewayMetrics, MetricsInterceptor
from services.gateway.scheduler_client import SchedulerClient
from services.text.codec import TextCodec

TRACED_AS = "inflight-gateway"
# Probes and the once-a-second stats poll to the scheduler: spans for those would bury the requests'.
UNTRACED = (*HEALTH_AND_REFLECTION, "/inflight.v1.Scheduler/GetStats")
PUBLIC_SERVICES = [
    generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name,
    generation_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
]
SERVER_OPTIONS = [
    *public_server_options(),
    ("grpc.max_receive_message_length", 8 * 2**20),
    # gRPC's core drops calls the application has not picked up yet past 1,000 pending (at random, up
    # to 3,000), and the client sees a bare CANCELLED. Let them all reach the gateway, whose admission
    # check answers RESOURCE_EXHAUSTED; each waits only as long as the check takes.
    ("grpc.server.max_pending_requests", 1_000_000),
    ("grpc.server.max_pending_requests_hard_limit", 1_000_000),
]


def server_credentials(config: GatewayConfig) -> grpc.ServerCredentials | None:
    if not config.tls_cert:
        return None
    key, cert = Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes()
    client_ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


async def poll_stats(scheduler: SchedulerClient, metrics: GatewayMetrics) -> None:
    while True:
        try:
            stats = await scheduler.stub.GetStats(common_pb2.GetStatsRequest(), timeout=2)
            stats.scheduler_restarts = scheduler.restarts
            metrics.observe_stats(stats)
        except grpc.aio.AioRpcError:
            metrics.scheduler_restarts.set(scheduler.restarts)
        await asyncio.sleep(1.0)


@dataclass
class Gateway:
    """A started gateway: its server, services and background tasks."""

    server: grpc.aio.Server
    generation: GenerationService
    scheduler: SchedulerClient
    metrics: GatewayMetrics
    health: health.aio.HealthServicer
    tasks: list[asyncio.Task[None]]
    address: str
    tracing: Tracing

    async def stop(self, drain_seconds: float) -> None:
        """NOT_SERVING, new generations UNAVAILABLE, streams in flight finish (up to drain_seconds), then stop."""
        for task in self.tasks:
            task.cancel()
        await self.health.enter_graceful_shutdown()
        self.generation.draining = True
        deadline = asyncio.get_running_loop().time() + drain_seconds
        while self.generation.in_flight and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)
        self.generation.stopping.set()  # subscriptions end with a status, not a cancelled handler
        await self.server.stop(grace=1.0)
        await self.scheduler.close()
        self.tracing.shutdown()


def add_kserve(generation: GenerationService, server: grpc.aio.Server) -> list[str]:
    """Triton's KServe v2 service on the gateway's server, where tritonclient (its stubs) is installed."""
    try:
        from tritonclient.grpc import service_pb2, service_pb2_grpc

        from services.gateway.kserve import KServeService
    except ImportError:
        structlog.get_logger().warning("kserve_off", reason="tritonclient is not installed: pip install inflight[kserve]")
        return []
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(KServeService(generation), server)
    return [service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name]


def add_trtllm(generation: GenerationService, server: grpc.aio.Server, tokenizer_folder: Path) -> list[str]:
    """TensorRT-LLM's gRPC service on the gateway's server, where smg-grpc-proto (its stubs) is installed."""
    try:
        from smg_grpc_proto.generated import trtllm_service_pb2, trtllm_service_pb2_grpc

        from services.gateway.trtllm import TrtllmService
    except ImportError:
        structlog.get_logger().warning("trtllm_off", reason="smg-grpc-proto is not installed: pip install inflight[trtllm]")
        return []
    trtllm_service_pb2_grpc.add_TrtllmServiceServicer_to_server(TrtllmService(generation, tokenizer_folder), server)
    return [trtllm_service_pb2.DESCRIPTOR.services_by_name["TrtllmService"].full_name]


async def start_gateway(config: GatewayConfig) -> Gateway:
    codec = TextCodec(Path(config.model))
    tracing = start_tracing(TRACED_AS, config.otlp_traces_endpoint, UNTRACED)
    scheduler = SchedulerClient(config.scheduler, KeepalivePolicy(config.keepalive_seconds), tracing.client_interceptors)
    metrics = GatewayMetrics()
    authenticator = None
    # Outermost first: the trace's span covers the whole call, every call is counted, malformed bytes never
    # reach a handler, then auth.
    interceptors: list[grpc.aio.ServerInterceptor] = [*tracing.server_interceptors, MetricsInterceptor(metrics.requests),
                                                      MalformedRequestInterceptor()]
    if config.auth_tokens_file:
        exempt = [p for p in config.auth_exempt.split(",") if p]
        authenticator = Authenticator(load_tokens(Path(config.auth_tokens_file)), exempt)
        interceptors.append(AuthInterceptor(authenticator))
    limits = AdmissionLimits(config.max_inflight_requests or AdmissionLimits.max_inflight_requests,
                             config.max_inflight_per_client, config.max_messages)
    # SO_REUSEPORT only where several gateway processes share the port on purpose: otherwise a second server on
    # a port in use would bind beside the first, and the kernel would split clients between the two.
    options = [*SERVER_OPTIONS, ("grpc.so_reuseport", int(config.share_port))]
    server = grpc.aio.server(interceptors=interceptors, options=options)
    generation = GenerationService(codec, scheduler, metrics, authenticator, limits, config.trust_message_special_tokens)
    generation_pb2_grpc.add_GenerationServicer_to_server(generation, server)
    generation_pb2_grpc.add_AdminServicer_to_server(AdminService(scheduler), server)
    services = list(PUBLIC_SERVICES)
    if config.kserve:
        services += add_kserve(generation, server)
    if config.trtllm:
        services += add_trtllm(generation, server, Path(config.model))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*services, health.SERVICE_NAME, reflection.SERVICE_NAME], server)

    def on_ready_change(ready: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *services):
            asyncio.get_running_loop().create_task(health_servicer.set(name, status))

    on_ready_change(False)
    address = f"{config.host}:{config.port}"
    credentials = server_credentials(config)
    try:
        bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:  # recent gRPC raises where older ones returned 0
        bound = 0
    if bound == 0:
        raise SystemExit(f"gateway: cannot listen on {address} (in use?)")
    if config.metrics_port:
        start_http_server(config.metrics_port, registry=metrics.exposition_registry())
    await server.start()
    tasks = [asyncio.create_task(scheduler.watch(on_ready_change)), asyncio.create_task(poll_stats(scheduler, metrics))]
    log = structlog.get_logger()
    log.info("gateway_listening", address=address, tls=credentials is not None, auth=authenticator is not None,
             metrics_port=config.metrics_port, traced=tracing.enabled)
    return Gateway(server, generation, scheduler, metrics, health_servicer, tasks, address, tracing)


async def serve(config: GatewayConfig) -> None:
    if config.exit_with_parent:
        die_with_parent(signal.SIGTERM)
    log = configure_logging("gateway", config.log_level)
    log.info("gateway_starting", config=str(config))
    gateway = await start_gateway(config)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("gateway_draining", in_flight=len(gateway.generation.in_flight), drain_seconds=config.drain_seconds)
    await gateway.stop(config.drain_seconds)
    log.info("gateway_stopped")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="inflight gateway", description=__doc__)
    GatewayConfig.add_arguments(parser)
    asyncio.run(serve(GatewayConfig.from_args(parser.parse_args(argv))))


if __name__ == "__main__":
    main()
