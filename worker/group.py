"""The worker group: rank 0 fans each command out over MPI, every rank runs it on its shard."""

from __future__ import annotations

import numpy as np
import structlog
from mpi4py import MPI

from worker.engine import Engine
from worker.fanout import HEADER_WORDS, Command, decode_step, encode_step
from worker.slot_tables import SlotTables
from worker.step import EngineDescription, PendingStep, Step

log = structlog.get_logger()


class WorkerGroup:
    """Rank 0's handle on all ranks: every call runs on every rank, in the same order.

    comm carries only this group's control traffic (a duplicate of the world communicator), so it
    never interleaves with whatever an engine sends between its ranks.
    """

    def __init__(self, comm: MPI.Comm, engine: Engine) -> None:
        self.comm = comm
        self.engine = engine
        self.tp_size = comm.Get_size()
        self.slot_tables = SlotTables(engine.describe().max_num_seqs)

    def _broadcast(self, command: Command, payload: np.ndarray | None = None) -> None:
        if self.tp_size == 1:
            return
        size = 0 if payload is None else len(payload)
        self.comm.Bcast(np.array([command, size], dtype=np.int64), root=0)
        if size:
            self.comm.Bcast(payload, root=0)

    def describe(self) -> EngineDescription:
        return self.engine.describe()

    def block_tables(self) -> dict[int, list[int]]:
        return self.slot_tables.tables

    def warmup(self) -> int:
        self._broadcast(Command.WARMUP)
        return self.engine.warmup()

    def launch(self, step: Step) -> PendingStep:
        """Launch a step that passed validation against slot_tables, on every rank."""
        self.slot_tables.apply(step)
        if self.tp_size > 1:  # a single rank has no one to tell
            self._broadcast(Command.STEP, encode_step(step))
        return self.engine.launch(step)

    def release_all(self) -> None:
        self._broadcast(Command.RELEASE_ALL)
        self.engine.release(self.slot_tables.slots())
        self.slot_tables.clear()

    def shutdown(self) -> None:
        self._broadcast(Command.SHUTDOWN)
        self.engine.shutdown()


def follow(comm: MPI.Comm, engine: Engine) -> None:
    """Ranks 1..N-1: run whatever rank 0 broadcasts until it says shut down.

    Like rank 0, a rank launches the next step before it reads the previous one's result, so that
    overlapped steps reach its device back to back.
    """
    header = np.empty(HEADER_WORDS, dtype=np.int64)
    slot_tables = SlotTables(engine.describe().max_num_seqs)
    pending: PendingStep | None = None
    while True:
        comm.Bcast(header, root=0)
        command, size = Command(int(header[0])), int(header[1])
        payload = np.empty(size, dtype=np.int64)
        if size:
            comm.Bcast(payload, root=0)
        launched = None
        if command is Command.STEP:
            step = decode_step(payload)
            slot_tables.apply(step)
            launched = _guarded(lambda: engine.launch(step))
        if pending is not None:
            _guarded(pending.result)
        pending = launched
        if command is Command.WARMUP:
            engine.warmup()
        elif command is Command.RELEASE_ALL:
            engine.release(slot_tables.slots())
            slot_tables.clear()
        elif command is Command.SHUTDOWN:
            engine.shutdown()
            return


def _guarded(call):  # type: ignore[no-untyped-def]
    """A step's failure on a follower: rank 0 fails the same step the same way and reports it; stay in lock-step."""
    try:
        return call()
    except Exception:
        log.exception("step_failed")
        return None
