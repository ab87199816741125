"""Process lifetime helpers shared by the stack's processes."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Linux: deliver sig to this process when its parent dies, even by SIGKILL, so no part of a
    stack outlives the launcher (or an MPI rank its mpiexec proxy)."""
    parent = os.getppid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)
    except OSError:
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), sig)


def main() -> None:
    """`python -m inflight.process PROGRAM ARGS...`: run PROGRAM so that it gets SIGTERM when this process's
    parent dies. For children that cannot ask for it themselves, such as mpiexec: a launcher killed with
    SIGKILL then leaves no worker group behind. (The death signal survives exec.)"""
    die_with_parent(signal.SIGTERM)
    os.execvp(sys.argv[1], sys.argv[1:])


if __name__ == "__main__":
    main()
