"""The processes a test starts: the environment they get, and finding a stack's worker ranks through /proc."""

from __future__ import annotations

import os
from pathlib import Path


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment to start a child process with: this one's as os.environ has it, plus extra.

    Importing mpi4py's MPI initialises MPI in the test process (the engine tests do). Open MPI's singleton
    start then adds its runtime variables to the C environment, which os.environ does not see; a child started
    with env=None inherits them, and an mpiexec started under it exits 1 at once. Passed explicitly, they are
    left out.
    """
    return {**os.environ, **(extra or {})}


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def descendants(root: int) -> list[int]:
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    parents = {pid: _parent(pid) for pid in pids}
    found, frontier = [], {root}
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        found += children
        frontier = set(children)
    return found


def worker_ranks(launcher_pid: int) -> dict[int, int]:
    """rank -> pid of every `python -m worker` rank below the launcher."""
    ranks = {}
    for pid in descendants(launcher_pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"worker" in cmdline and b"-m" in cmdline:
            rank = next((e.split(b"=", 1)[1] for e in environ  # MPICH's name, then Open MPI's
                         if e.startswith((b"PMI_RANK=", b"OMPI_COMM_WORLD_RANK="))), None)
            if rank is not None:
                ranks[int(rank)] = pid
    return ranks


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"


def stack_processes(launcher_pid: int) -> dict[str, int]:
    """'scheduler' and 'gateway' -> pid of that process below the launcher."""
    found = {}
    for pid in descendants(launcher_pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for name, module in (("scheduler", b"scheduler"), ("gateway", b"services.gateway")):
            if b"-m" in cmdline and module in cmdline:
                found[name] = pid
    return found
