"""GPU time per call of work captured in one CUDA graph, as the engine's graphed steps run it (no host cost)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def graphed_calls_us(calls: Sequence[Callable[[], object]], replays: int = 10) -> float:
    """GPU microseconds per call: the calls captured back to back in one CUDA graph (each run once on a side
    stream first, which compiles and warms it up outside the capture), the graph replayed `replays` times."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (replays * len(calls))


def graphed_us(fn: Callable[[], object], calls: int = 20, replays: int = 10) -> float:
    """GPU microseconds per call of fn, `calls` calls of it in one graph."""
    return graphed_calls_us([fn] * calls, replays)
