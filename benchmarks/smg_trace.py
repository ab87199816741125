"""SMG's own account of each cache-aware routing choice, read back from its log.

With `SMG_CACHE_TRACE=1` and `SMG_CACHE_TRACE_SAMPLE=1` in its environment, SMG logs one
"Cache routing dispatch" record per request: the worker it chose, the branch that chose it
(an overlap hit, or `event_miss` and its least-expected-wait fallback), each candidate's in-flight
count as SMG keeps it, and each candidate's expected-wait score with the parts it is made of.

    SMG_CACHE_TRACE=1 SMG_CACHE_TRACE_SAMPLE=1 .venv/bin/python -m benchmarks.smg_replicas ... --out DIR
    .venv/bin/python -m benchmarks.smg_trace DIR/smg-0.log
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path

_COLOURS = re.compile(r"\x1b\[[0-9;]*m")
_MARK = "evidence="


@dataclass
class Score:
    seconds: float
    queued_tokens: int  # the worker's reported uncached prompt tokens waiting
    running_estimated_tokens: int  # SMG's guess for the requests it reports running
    since_poll_tokens: int  # tokens SMG dispatched there that it does not yet take as reported


@dataclass
class Decision:
    worker: str | None  # None: every worker was over an overload gate; SMG sent it to the least-loaded one
    branch: str
    in_flight: dict[str, int]  # SMG's own count of requests on each candidate
    scores: dict[str, Score]

    @property
    def chose_busier(self) -> bool:
        """Chose a worker holding more requests than the least-held one."""
        return self.worker is not None and self.in_flight[self.worker] > min(self.in_flight.values())


def decisions(log_path: Path) -> list[Decision]:
    found: list[Decision] = []
    for line in _COLOURS.sub("", log_path.read_text(errors="replace")).splitlines():
        at = line.find(_MARK)
        if at < 0 or "Cache routing dispatch" not in line:
            continue
        selection = json.loads(line[at + len(_MARK):])["selections"][0]
        prediction = selection["prediction"]  # None when every worker was over an overload gate
        found.append(Decision(
            worker=selection["worker"], branch=prediction.get("branch", "") if prediction else "all_overloaded",
            in_flight={c["worker"]: c["load"] for c in selection["candidates"]},
            scores={s["worker"]: Score(s["score"], int(s["queued_tokens"]), int(s["running_estimated_tokens"]),
                                       int(s["since_poll_tokens"])) for s in selection.get("scores", [])}))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log", type=Path, help="an SMG log written with the trace on")
    args = parser.parse_args()
    found = decisions(args.log)
    names = {w: f"w{i}" for i, w in enumerate(sorted({w for d in found for w in d.in_flight}))}
    for d in found:
        parts = "  ".join(f"{names[w]}: {d.in_flight[w]} in flight, {s.seconds:.2f} s = q{s.queued_tokens} "
                          f"r{s.running_estimated_tokens} d{s.since_poll_tokens}" for w, s in d.scores.items())
        chosen = names[d.worker] if d.worker else "--"
        print(f"{'!' if d.chose_busier else ' '} {chosen} {d.branch:24s} {parts}")
    print(f"{sum(d.chose_busier for d in found)} of {len(found)} choices went to a worker holding more requests "
          "than the least-held one (marked !)")


if __name__ == "__main__":
    main()
