"""The device's timeline from CUPTI at CUDA-graph granularity, for benchmarks (needs NVIDIA's `cupti-python`).

What Nsight Systems records with `--cuda-graph-trace=graph`: one activity per graph launch, from its first
node's start to its last node's end, and every kernel, copy and memset launched outside a graph. The torch
profiler instead traces each node of each graph, tens of thousands of records per hundred decode steps, and
that tracing slows the launches it watches; a graph-level record costs next to nothing.

CUPTI must trace graph launches from before a graph is instantiated (enabling it later crashes the next
replay), so a CuptiTimeline is made before the engine captures its graphs; the records of graph launches
outside the window are dropped as they arrive. The window is one per process: at its end graph launches are
no longer traced (nothing traced costs the steps after it anything), and tracing cannot resume on graphs
already made. A process holds one CUPTI client: not both this and the torch profiler.
"""

from __future__ import annotations

import threading

import torch
from cupti import cupti

_BUFFER_BYTES = 8 << 20
_KIND = cupti.ActivityKind
_OUTSIDE_GRAPHS = (_KIND.CONCURRENT_KERNEL, _KIND.MEMCPY, _KIND.MEMSET)


class CuptiTimeline:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._collecting = False
        self._records: list[tuple[float, float, str]] = []  # start, end (microseconds), kernel name or ""
        cupti.activity_enable(_KIND.GRAPH_TRACE)
        cupti.activity_register_callbacks(self._buffer_requested, self._buffer_completed)

    @staticmethod
    def _buffer_requested() -> tuple[int, int]:
        return _BUFFER_BYTES, 0  # as many records as fit

    def _buffer_completed(self, activities: list) -> None:
        with self._lock:
            if self._collecting:
                self._records.extend((a.start / 1e3, a.end / 1e3, getattr(a, "name", "") or "") for a in activities)

    def start(self) -> None:
        """From now on, keep graph launches and trace the work outside graphs too."""
        cupti.activity_flush_all(1)
        with self._lock:
            self._records, self._collecting = [], True
        for kind in _OUTSIDE_GRAPHS:
            cupti.activity_enable(kind)

    def stop(self) -> list[tuple[float, float, str]]:
        """The window's activities, (start, end, name) in microseconds, once the device has run them; tracing
        ends for good."""
        torch.cuda.synchronize()
        cupti.activity_flush_all(1)
        for kind in (*_OUTSIDE_GRAPHS, _KIND.GRAPH_TRACE):
            cupti.activity_disable(kind)
        with self._lock:
            records, self._records, self._collecting = self._records, [], False
        return records
