"""The torch engine's process setup: threads, the device, torch.distributed for tensor parallelism."""

from __future__ import annotations

import structlog
import torch
from mpi4py import MPI

from inflight.cpus import usable_cpus
from worker.config import WorkerConfig
from worker.parallel import Collectives, ShardPlan
from worker.peer_all_reduce import peer_all_reduce
from worker.torch_engine.distributed import init_distributed
from worker.torch_engine.engine import TorchEngine, resolve_dtype

log = structlog.get_logger()


def create_torch_engine(config: WorkerConfig, comm: MPI.Comm) -> TorchEngine:
    rank, size = comm.Get_rank(), comm.Get_size()
    hosts = comm.allgather(MPI.Get_processor_name())
    if config.device == "cpu":  # the ranks of one host share its cores, unless told how many each takes
        torch.set_num_threads(config.cpu_threads or max(1, usable_cpus() // hosts.count(hosts[rank])))
    peer = None
    if size > 1:
        init_distributed(comm, config.device, hosts)
        if config.device == "cuda" and config.peer_all_reduce:
            peer = peer_all_reduce(torch.device("cuda", torch.cuda.current_device()), resolve_dtype(config),
                                   config.peer_add_norm)
    elif config.device == "cuda":
        torch.cuda.set_device(0)
    engine = TorchEngine(config, ShardPlan(rank, size), Collectives(size, peer))
    log.info("engine_loaded", rank=rank, tp_size=size, kv_blocks=engine.num_kv_blocks, device=str(engine.device),
             weight_bytes=engine.model.weight_bytes(), threads=torch.get_num_threads(), peer_all_reduce=peer is not None)
    return engine
