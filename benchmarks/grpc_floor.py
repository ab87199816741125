"""The floor under the gateway's load shedding: a bare grpcio aio server that refuses every Generate at once.

Run it, then point a flood at it (`node benchmarks/node/flood.mjs --target 127.0.0.1:50097 ...`): whatever
latency it shows is gRPC's own per-call cost on this machine, which no admission check in Python can beat.
It uses the gateway's pending-queue options, so a burst is refused, never dropped.

  .venv/bin/python benchmarks/grpc_floor.py --port 50097
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator

import grpc

from inflight.v1 import generation_pb2, generation_pb2_grpc
from services.gateway.__main__ import SERVER_OPTIONS


class RefuseEverything(generation_pb2_grpc.GenerationServicer):
    async def Generate(self, request: generation_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[generation_pb2.GenerateResponse]:
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "full")
        yield generation_pb2.GenerateResponse()  # never reached; makes this a streaming handler


async def serve(port: int) -> None:
    server = grpc.aio.server(options=SERVER_OPTIONS)
    generation_pb2_grpc.add_GenerationServicer_to_server(RefuseEverything(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=50097)
    asyncio.run(serve(parser.parse_args().port))
