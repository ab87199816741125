"""An optional look at the device's timeline over rank 0's steps, for benchmarks: --profile-steps FIRST:LAST:FILE.

Steps FIRST..LAST (counted from the first step this process launches) run under a tracer of the device's
activity: torch.profiler (the default), or with --profile-tracer cupti, CUPTI at CUDA-graph granularity
(worker/cupti_timeline.py, one record per graph launch, as Nsight Systems traces graphs). As many steps again,
starting EVENTS_AFTER steps after LAST (so that the tracer's own wind-down, which stalls the steps in flight,
stays out), are timed with CUDA events alone (one before and one after each step's work), which costs the host
nothing. When both windows are done, FILE gets a JSON summary of each: the span, the time the device was busy,
and how much of the span it ran nothing (between any two kernels, or between steps), and how much of the time
from the end of one decode-only step to the end of the next decode-only step after it it sat idle between the
two (under the tracer also: in all, with the gaps between the later step's kernels). Under the tracer, each
step's work is preceded on the device by a marker kernel (a one-cycle spin) that splits the timeline into
steps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
import torch

if TYPE_CHECKING:
    from worker.config import WorkerConfig
    from worker.cupti_timeline import CuptiTimeline

log = structlog.get_logger()

EVENTS_AFTER = 10
MARKER_KERNEL = "spin_kernel"  # what torch.cuda._sleep launches


class StepProfiler:
    def __init__(self, spec: str, tracer: str = "torch") -> None:
        first, last, path = spec.split(":", 2)
        self.first, self.last, self.path = int(first), int(last), Path(path)
        self.events_first = self.last + EVENTS_AFTER
        self.events_last = self.events_first + self.last - self.first
        self.launched = 0
        self._profile: torch.profiler.profile | None = None
        self._cupti: CuptiTimeline | None = None
        if tracer == "cupti":  # made before the engine captures its graphs; cupti-python only where asked for
            from worker.cupti_timeline import CuptiTimeline
            self._cupti = CuptiTimeline()
        self._tracing = False
        self._profile_summary: dict[str, float] = {}
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event, bool]] = []  # start, end, decode-only
        self._profiled_decode_only: list[bool] = []  # each marked step under the profiler, in launch order

    @staticmethod
    def from_config(config: WorkerConfig) -> StepProfiler | None:
        """The profiler config.profile_steps asks for; None without it, or without CUDA."""
        if not config.profile_steps or not torch.cuda.is_available():
            return None
        return StepProfiler(config.profile_steps, config.profile_tracer)

    def launching(self, decode_only: bool) -> None:
        """Before a step's work is queued (on the engine's thread)."""
        self.launched += 1
        if self.launched == self.first:
            self._tracing = True
            if self._cupti is not None:
                self._cupti.start()
            else:  # the device's activity only: recording every host-side op would slow the very steps it times
                self._profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
                self._profile.__enter__()
        if self._tracing:
            torch.cuda._sleep(1)  # the step's first work on the device: where its part of the timeline begins
            self._profiled_decode_only.append(decode_only)
        if self.events_first <= self.launched <= self.events_last:
            self._events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True), decode_only))
            self._events[-1][0].record()

    def launched_step(self) -> None:
        """After a step's work is queued."""
        if self.events_first <= self.launched <= self.events_last:
            self._events[-1][1].record()

    def finished(self) -> None:
        """A step's result was read (so its device work is done)."""
        if self._tracing and self.launched >= self.last:
            self._tracing = False
            if self._cupti is not None:
                activity, tracer = self._cupti.stop(), "cupti-graph"
            else:
                profile, self._profile = self._profile, None
                assert profile is not None
                profile.__exit__(None, None, None)
                activity, tracer = torch_activity(profile), "torch"
            self._profile_summary = {"tracer": tracer, **kernel_timeline(activity, self._profiled_decode_only)}
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
    bounds = (20.0, 200.0, 1000.0, float("inf"))  # the idle time in gaps up to each bound (from the last one)
    idle_by_gap_size = {f"up_to_{b:g}us": sum(g for g in gaps if low < g <= b) for low, b in zip((0.0, *bounds), bounds)}
    return {"intervals": len(spans), "span_us": span, "busy_us": busy, "idle_fraction": 1 - busy / span,
            "gaps_over_20us": sum(1 for g in gaps if g > 20), "largest_gaps_us": gaps[-5:],
            "idle_us_by_gap_size": idle_by_gap_size}


def torch_activity(profile: torch.profiler.profile) -> list[tuple[float, float, str]]:
    """The profiler's device activities: (start, end, name), in microseconds."""
    return [(e.time_range.start, e.time_range.end, e.name) for e in profile.events()
            if e.device_type == torch.autograd.DeviceType.CUDA]


def kernel_timeline(activity: list[tuple[float, float, str]], decode_only: list[bool]) -> dict[str, float]:
    """From a tracer's (start, end, name) activities: the device's work; and, split into steps at the markers
    (the k-th marker begins the k-th step of decode_only), the idle share between decode-only steps."""
    spans = sorted((start, end) for start, end, _ in activity)
    if not spans:
        return {"intervals": 0}
    summary = _idle(spans)
    markers = sorted(start for start, _, name in activity if MARKER_KERNEL in name)
    summary.update(decode_pair_idle(spans, markers, decode_only))
    return summary


def decode_pair_idle(spans: list[tuple[float, float]], markers: list[float], decode_only: list[bool]) -> dict[str, float]:
    """Step k is the activity from marker k to marker k+1 (complete once marker k+1 ran). For each complete
    decode-only step k+1 after a decode-only step k, over the time from the end of step k's last activity to
    the end of step k+1's: the share the device sat idle between the two steps (until marker k+1), as the
    CUDA events measure it; and the share idle in all, the gaps between step k+1's kernels included."""
    ends = []  # the end of each complete step's last activity
    for start, following in zip(markers, markers[1:]):
        ends.append(max((e for s, e in spans if start <= s < following), default=start))
    between = idle = period = 0.0
    pairs = 0
    for k in range(len(ends) - 1):
        if not (decode_only[k] and decode_only[k + 1]):
            continue
        low, high = ends[k], ends[k + 1]
        busy, reach = 0.0, low
        for s, e in spans:
            if e <= reach or s >= high:
                continue
            busy += min(e, high) - max(s, reach)
            reach = min(e, high)
        between += max(0.0, markers[k + 1] - low)
        idle += (high - low) - busy
        period += high - low
        pairs += 1
    return {"marked_steps": len(markers), "decode_step_pairs": pairs,
            "decode_idle_fraction": between / period if period else 0.0,
            "decode_idle_fraction_with_kernel_gaps": idle / period if period else 0.0}


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
