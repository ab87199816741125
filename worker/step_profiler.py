"""An optional look at the device's timeline over rank 0's steps, for benchmarks: INFLIGHT_PROFILE_STEPS=FIRST:LAST:FILE.

Steps FIRST..LAST (counted from the first step this process launches) run under torch.profiler,
recording the device's activity only; as many steps again, starting EVENTS_AFTER steps after LAST (so
that the profiler's own wind-down, which stalls the steps in flight, stays out), are timed with CUDA
events alone (one before and one after each step's work), which costs the host nothing. When both windows
are done, FILE gets a JSON summary of each: the span, the time the device was busy, and how much of the
span it ran nothing (from the profiler: between any two kernels; from the events: between steps, and
between two decode-only steps in a row).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import structlog
import torch

log = structlog.get_logger()

EVENTS_AFTER = 10


class StepProfiler:
    def __init__(self, spec: str) -> None:
        first, last, path = spec.split(":", 2)
        self.first, self.last, self.path = int(first), int(last), Path(path)
        self.events_first = self.last + EVENTS_AFTER
        self.events_last = self.events_first + self.last - self.first
        self.launched = 0
        self._profile: torch.profiler.profile | None = None
        self._profile_summary: dict[str, float] = {}
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event, bool]] = []  # start, end, decode-only

    @staticmethod
    def from_environment() -> StepProfiler | None:
        spec = os.environ.get("INFLIGHT_PROFILE_STEPS", "")
        return StepProfiler(spec) if spec and torch.cuda.is_available() else None

    def launching(self, decode_only: bool) -> None:
        """Before a step's work is queued (on the engine's thread)."""
        self.launched += 1
        if self.launched == self.first:
            # The device's activity only: recording every host-side op would slow the very steps it times.
            self._profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
            self._profile.__enter__()
        if self.events_first <= self.launched <= self.events_last:
            self._events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True), decode_only))
            self._events[-1][0].record()

    def launched_step(self) -> None:
        """After a step's work is queued."""
        if self.events_first <= self.launched <= self.events_last:
            self._events[-1][1].record()

    def finished(self) -> None:
        """A step's result was read (so its device work is done)."""
        if self._profile is not None and self.launched >= self.last:
            profile, self._profile = self._profile, None
            profile.__exit__(None, None, None)
            self._profile_summary = kernel_timeline(profile)
        if self._events and self.launched >= self.events_last:
            events, self._events = self._events, []
            torch.cuda.synchronize()
            summary = {"profiler_steps": [self.first, self.last], "profiler": self._profile_summary,
                       "events_steps": [self.events_first, self.events_last], "events": step_timeline(events)}
            self.path.write_text(json.dumps(summary))
            log.info("step_profile_written", path=str(self.path))


def _idle(spans: list[tuple[float, float]]) -> dict[str, float]:
    """Busy time and gaps of sorted (start, end) intervals, in microseconds."""
    busy, gaps = 0.0, []
    start, end = spans[0]
    for s, e in spans[1:]:
        if s > end:
            busy += end - start
            gaps.append(s - end)
            start, end = s, e
        else:
            end = max(end, e)
    busy += end - start
    span = max(e for _, e in spans) - spans[0][0]
    gaps.sort()
    return {"intervals": len(spans), "span_us": span, "busy_us": busy, "idle_fraction": 1 - busy / span,
            "gaps_over_20us": sum(1 for g in gaps if g > 20), "largest_gaps_us": gaps[-5:]}


def kernel_timeline(profile: torch.profiler.profile) -> dict[str, float]:
    """From the profiler: the device's kernels and copies."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in profile.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    return _idle(spans) if spans else {"intervals": 0}


def step_timeline(events: list[tuple[torch.cuda.Event, torch.cuda.Event, bool]]) -> dict[str, float]:
    """From the events: each step's device work, from its first queued operation to its last; and the idle
    share of the time from the end of one decode-only step to the end of the next decode-only step after it."""
    origin = events[0][0]
    spans = [(origin.elapsed_time(start) * 1e3, origin.elapsed_time(end) * 1e3) for start, end, _ in events]
    summary = _idle(spans)
    pairs = [(spans[i], spans[i + 1]) for i in range(len(spans) - 1) if events[i][2] and events[i + 1][2]]
    idle = sum(max(0.0, b[0] - a[1]) for a, b in pairs)
    period = sum(b[1] - a[1] for a, b in pairs)
    summary.update(decode_step_pairs=len(pairs), decode_idle_fraction=idle / period if period else 0.0)
    return summary
