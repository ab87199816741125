"""Where each request landed, from the replicas' logs of a `benchmarks/smg_replicas.py` run.

    python benchmarks/replica_arrivals.py benchmarks/results/smg-replicas-cpu-repeats --requests 72

The run's requests are taken in arrival order, `--requests` per run, in the order the runs were made.
For each run the script counts what every request found on its replica when it arrived: how many
other requests were still prefilling (no first token yet) and how many were decoding. It also gives
the TTFT of each case. A request that lands beside a prefill under way waits for that prefill too.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
from datetime import datetime
from pathlib import Path


def read_requests(folder: Path) -> list[dict]:
    requests: dict[str, dict] = {}
    for path in sorted(folder.glob("replica-*.log*")):
        replica = int(path.name.split("-")[1].split(".")[0])
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as lines:
            for line in lines:
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if "request_id" not in event:
                    continue
                request = requests.setdefault(event["request_id"], {"replica": replica})
                at = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()
                if event["event"] == "request_queued":
                    request["arrived"], request["prompt"] = at, event["prompt_tokens"]
                elif event["event"] == "request_finished" and event.get("process") == "scheduler":
                    request["finished"] = at
                elif event["event"] == "request_done":
                    request["ttft_ms"] = event["ttft_ms"]
    done = [r for r in requests.values() if {"arrived", "finished", "ttft_ms"} <= r.keys()]
    for r in done:
        r["first_token"] = r["arrived"] + r["ttft_ms"] / 1000
    return sorted(done, key=lambda r: r["arrived"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--requests", type=int, default=72, help="requests per run")
    parser.add_argument("--min-prompt", type=int, default=100, help="leave out shorter prompts (the warm-ups)")
    args = parser.parse_args()
    everything = read_requests(args.folder)
    measured = [r for r in everything if r["prompt"] >= args.min_prompt]
    for run in range(len(measured) // args.requests):
        cases = collections.defaultdict(list)
        for r in measured[run * args.requests : (run + 1) * args.requests]:
            mates = [x for x in everything if x is not r and x["replica"] == r["replica"]]
            prefilling = sum(1 for x in mates if x["arrived"] <= r["arrived"] < x["first_token"])
            decoding = sum(1 for x in mates if x["first_token"] <= r["arrived"] < x["finished"])
            cases[prefilling, decoding].append(r["ttft_ms"])
        beside = sum(len(v) for (p, _), v in cases.items() if p)
        print(f"run {run}: {beside} of {args.requests} arrived beside a prefill under way")
        for (prefilling, decoding), ttfts in sorted(cases.items()):
            ttfts.sort()
            print(f"  {prefilling} prefilling, {decoding} decoding: {len(ttfts):3d} requests, "
                  f"TTFT median {ttfts[len(ttfts) // 2]:5.0f} ms, max {ttfts[-1]:5.0f} ms")


if __name__ == "__main__":
    main()
