"""Rank 0 runs every engine call on its main thread; gRPC's threads only hand calls over.

On CPU this is a matter of speed: a forward pass started from a thread other than the one
that loaded the model runs torch's OpenMP kernels as if with a single thread (measured on
the 2-core CI machine, SmolLM2 fp32: a batch-1 decode step takes 48 ms from a gRPC thread and
29 ms from the main thread). The follower ranks already run on their main thread.
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

T = TypeVar("T")


class EngineThread:
    """A queue of calls that the thread calling `serve_forever` runs one at a time, in order."""

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[tuple[Future, Callable[[], object]]] = queue.SimpleQueue()

    def call(self, function: Callable[[], T]) -> T:
        """Run function on the engine thread and return its result (or raise its exception)."""
        future: Future = Future()
        self._calls.put((future, function))
        return future.result()

    def serve_forever(self) -> None:
        while True:
            future, function = self._calls.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(function())
            except BaseException as error:  # handed to the caller, who decides what it means
                future.set_exception(error)
