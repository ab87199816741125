"""A rank of a tensor-parallel group on GPUs freezes (SIGSTOP, as a GPU hang or an NCCL deadlock would) while
24 streams run: every stream must end UNAVAILABLE within the step bound + 5 s, the group be replaced, and the
stack serve again. The CPU version is tests/test_resilience.py; this one puts NCCL collectives in the way.

  python3 benchmarks/gpu_frozen_rank.py --tp 2 --model random:llama-3-1b --tokenizer .carry/tokenizer
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time

import grpc

from tests.processes import alive, worker_ranks
from tests.stack import ServedStack
from tests.test_resilience import Streams, serve_again_within


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--rank", type=int, default=1, help="the rank to freeze")
    parser.add_argument("--model", default="random:llama-3-1b")
    parser.add_argument("--tokenizer", default=".carry/tokenizer")
    parser.add_argument("--bound", type=float, default=3.0)
    parser.add_argument("--liveness", type=float, default=5.0)
    args = parser.parse_args()
    served = ServedStack("--device", "cuda", "--tp", str(args.tp), "--model", args.model, "--tokenizer", args.tokenizer,
                         "--step-timeout", str(args.bound), "--step-timeout-per-token", "0",
                         "--liveness-timeout", str(args.liveness)).wait_ready(timeout=600)
    try:
        ranks = worker_ranks(served.process.pid)
        streams = Streams(served, 24)
        frozen_at = time.monotonic()
        os.kill(ranks[args.rank], signal.SIGSTOP)
        streams.join(120)
        ended = max(at for _, at in streams.ended) - frozen_at
        back = serve_again_within(served, 300)
        stats = served.wait_idle()
        report = {
            "tp": args.tp, "frozen_rank": args.rank, "bound_s": args.bound, "liveness_s": args.liveness,
            "codes": sorted({code.name for code, _ in streams.ended}), "streams_ended": len(streams.ended),
            "last_stream_ended_after_s": round(ended, 2), "serving_again_after_s": round(ended + back, 2),
            "old_ranks_alive": [pid for pid in ranks.values() if alive(pid)],
            "worker_restarts": stats.worker_restarts, "blocks_free": f"{stats.kv_blocks_free}/{stats.kv_blocks_total}",
        }
        report["passed"] = (report["codes"] == [grpc.StatusCode.UNAVAILABLE.name] and ended <= args.bound + 5
                            and not report["old_ranks_alive"] and stats.kv_blocks_free == stats.kv_blocks_total)
        print("REPORT " + json.dumps(report), flush=True)
    finally:
        tail = served.log_tail(6)
        print("stack exit", served.stop(), flush=True)
        print(tail)


if __name__ == "__main__":
    main()
