"""The seam between the worker group and an engine: what every engine does, and how one is picked by name.

The worker group (rank 0's gRPC service, the MPI fan-out, plan validation) knows engines only
through this protocol. An engine owns its weights, its KV cache and whatever per-slot state its
kernels need; the group keeps its own record of slots and block tables (worker/slot_tables.py), so
nothing outside an engine reads its internals. tests/test_engine_conformance.py is the suite any
engine must pass as it stands.
"""

from __future__ import annotations

import importlib
from typing import Protocol

from mpi4py import MPI

from worker.config import WorkerConfig
from worker.step import EngineDescription, PendingStep, Step


class Engine(Protocol):
    def describe(self) -> EngineDescription:
        """Model, limits and cache geometry: what the scheduler plans against (the handshake)."""
        ...

    def warmup(self) -> int:
        """Run the largest step once so later steps cannot run out of memory; the usable KV block count."""
        ...

    def launch(self, step: Step) -> PendingStep:
        """Apply the step's releases and admissions, queue its chunks' forward and sampling; a checked step only.

        It may return before the device is done: the group launches the next step (whose PREVIOUS_TOKEN
        inputs are this step's samples, read on the device) before it reads this one's result, and reads
        results in launch order.
        """
        ...

    def release(self, slot_ids: list[int]) -> None:
        """Forget these slots (unknown ones are ignored); their blocks are the scheduler's again."""
        ...

    def shutdown(self) -> None:
        ...


# name -> "module:function" taking (WorkerConfig, the world communicator); imported only when chosen.
ENGINES: dict[str, str] = {
    "torch": "worker.torch_engine.factory:create_torch_engine",
}


def create_engine(config: WorkerConfig, comm: MPI.Comm) -> Engine:
    """This rank's engine of the configured name (every rank of the group calls it)."""
    if config.engine not in ENGINES:
        raise ValueError(f"unknown engine {config.engine!r}; known: {', '.join(ENGINES)}")
    module, function = ENGINES[config.engine].split(":")
    factory = getattr(importlib.import_module(module), function)
    engine: Engine = factory(config, comm)
    return engine
