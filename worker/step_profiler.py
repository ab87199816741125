"""An optional torch profiler window over rank 0's steps, for benchmarks: INFLIGHT_PROFILE_STEPS=FIRST:LAST:FILE.

Steps FIRST..LAST (counted from the first step this process launches) run under torch.profiler. When
the window closes, FILE gets a JSON summary of the device's timeline over it: the span from the first
kernel to the last, the time some kernel or copy was running, and the idle gaps between them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import structlog
import torch

log = structlog.get_logger()


class StepProfiler:
    def __init__(self, spec: str) -> None:
        first, last, path = spec.split(":", 2)
        self.first, self.last, self.path = int(first), int(last), Path(path)
        self.launched = 0
        self._profile: torch.profiler.profile | None = None

    @staticmethod
    def from_environment() -> StepProfiler | None:
        spec = os.environ.get("INFLIGHT_PROFILE_STEPS", "")
        return StepProfiler(spec) if spec else None

    def launching(self) -> None:
        self.launched += 1
        if self.launched == self.first:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profile = torch.profiler.profile(activities=activities)
            self._profile.__enter__()

    def finished(self) -> None:
        """A step's result was read; the window closes after the result of step LAST."""
        if self._profile is None or self.launched < self.last:
            return
        profile, self._profile = self._profile, None
        profile.__exit__(None, None, None)
        self.path.write_text(json.dumps(device_timeline(profile)))
        log.info("step_profile_written", path=str(self.path))


def device_timeline(profile: torch.profiler.profile) -> dict[str, float]:
    """Busy and idle time of the device from the profiled kernels and copies (microseconds)."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in profile.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    if not spans:
        return {"kernels": 0}
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
    span = spans[-1][1] - spans[0][0]
    gaps.sort()
    return {"kernels": len(spans), "span_us": span, "busy_us": busy, "idle_fraction": 1 - busy / span,
            "gaps_over_20us": sum(1 for g in gaps if g > 20), "idle_in_gaps_over_20us": sum(g for g in gaps if g > 20),
            "largest_gaps_us": gaps[-10:]}
