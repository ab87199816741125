"""Rank 0's watchdog: a step that outlives its bound means a rank hangs, so the group goes down.

A frozen rank (a GPU hang, a deadlocked collective, SIGSTOP) blocks every other rank inside the
step's collectives, and nothing inside the step can notice. This thread can: when the running
step passes its deadline it exits rank 0's process, mpiexec then ends every rank, and whoever
supervises the group (the launcher, or a Kubernetes LeaderWorkerSet) starts a new one. A group
that cannot finish a step can serve nothing; restarting it is the only way back.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable

import structlog

log = structlog.get_logger()

EXIT_STEP_HUNG = 75  # the exit status of a rank 0 that gave up on a hung step


class StepWatchdog:
    def __init__(self, on_hung: Callable[[int, float], None] | None = None, poll_seconds: float = 0.25) -> None:
        self._on_hung = on_hung or _exit_group
        self._poll = poll_seconds
        self._lock = threading.Lock()
        self._step: tuple[int, float, float] | None = None  # step id, deadline, bound
        threading.Thread(target=self._watch, name="step-watchdog", daemon=True).start()

    def arm(self, step_id: int, bound_seconds: float) -> None:
        """A step starts; bound_seconds <= 0 leaves it unbounded."""
        with self._lock:
            self._step = (step_id, time.monotonic() + bound_seconds, bound_seconds) if bound_seconds > 0 else None

    def disarm(self) -> None:
        with self._lock:
            self._step = None

    def _watch(self) -> None:
        while True:
            time.sleep(self._poll)
            with self._lock:
                step = self._step
            if step is not None and time.monotonic() > step[1]:
                self.disarm()
                self._on_hung(step[0], step[2])


def _exit_group(step_id: int, bound_seconds: float) -> None:
    log.error("step_hung_exiting", step_id=step_id, bound_seconds=round(bound_seconds, 3))
    sys.stderr.flush()
    os._exit(EXIT_STEP_HUNG)
