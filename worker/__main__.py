"""A worker rank: `mpiexec -n TP python -m worker --model DIR --listen ADDR ...`."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from mpi4py import MPI

from inflight.connection import KeepalivePolicy
from inflight.log import configure_logging
from inflight.process import die_with_parent
from inflight.v1 import worker_pb2_grpc
from worker.config import WorkerConfig
from worker.engine import create_engine
from worker.engine_thread import EngineThread
from worker.group import WorkerGroup, follow
from worker.service import WorkerService
from worker.step_profiler import StepProfiler
from worker.watchdog import StepWatchdog


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="inflight worker", description=__doc__)
    WorkerConfig.add_arguments(parser)
    config = WorkerConfig.from_args(parser.parse_args(argv))
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    log = configure_logging(f"worker-{rank}", config.log_level)
    if rank == 0:
        log.info("worker_starting", config=str(config), tp_size=comm.Get_size())
    die_with_parent()  # if the MPI launcher's proxy dies, take this rank down too
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    try:
        engine = create_engine(config, comm)
    except Exception:
        log.exception("engine_failed_to_load")
        comm.Abort(1)
        raise
    control = comm.Dup()  # the group's commands on their own communicator (collective: every rank)
    if rank != 0:
        try:
            follow(control, engine)
        except Exception:
            log.exception("rank_failed")
            comm.Abort(1)
        return
    serve(config, WorkerGroup(control, engine), log)


def serve(config: WorkerConfig, group: WorkerGroup, log: object) -> None:
    # One thread runs steps; the stream is strictly one plan, then its result. Health answers from
    # another thread, so a supervisor can tell a busy rank 0 from a frozen one.
    options = [("grpc.max_receive_message_length", 64 * 2**20),
               *KeepalivePolicy(config.keepalive_seconds).server_options()]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=options)
    engine_thread = EngineThread()
    worker_pb2_grpc.add_WorkerServicer_to_server(WorkerService(group, StepWatchdog(), engine_thread,
                                                                 StepProfiler.from_config(config)), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if server.add_insecure_port(config.listen) == 0:
        print(f"worker: cannot listen on {config.listen}", file=sys.stderr)
        group.comm.Abort(1)
    server.start()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    log.info("worker_serving", listen=config.listen, description=str(group.describe()))  # type: ignore[attr-defined]
    try:
        engine_thread.serve_forever()  # SIGTERM ends the process
    finally:
        group.shutdown()


if __name__ == "__main__":
    main()
