"""The whole stack at TP=2 on two GPUs (peer all-reduce on): TP=1's greedy tokens, and --batch-invariant served.

    python benchmarks/gpu_tp_stack.py      # on a 2-GPU device machine, after `source benchmarks/gpu_env.sh`

1. Random Llama-3-8B shape in float32, `inflight serve --tp 1` then `--tp 2`: eight greedy requests one
   at a time give the same tokens; then sixteen mixed requests at once (greedy, seeded top-p, penalised,
   logprobs with a stop id) all finish, with every block free and none failed.
2. bfloat16 at TP=2 with `--batch-invariant`: four greedy requests give the same tokens one at a time
   as inside sixteen at once.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.gpu_overlap_smoke import req  # noqa: E402
from inflight.v1 import generation_pb2  # noqa: E402
from tests.stack import ServedStack  # noqa: E402


def request(i: int, greedy: bool = False) -> generation_pb2.GenerateRequest:
    return req(i, "Tell me about topic number {} in detail, please.", 32, greedy)


def serve(*flags: str) -> ServedStack:
    return ServedStack("--model", "random:llama-3-8b", "--device", "cuda", "--tokenizer", ".carry/tokenizer",
                       "--num-kv-blocks", "1024", "--max-num-seqs", "32", "--log-level", "warning",
                       *flags).wait_ready(timeout=900)


def all_at_once(stack: ServedStack, requests: list[generation_pb2.GenerateRequest]) -> list:
    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(lambda r: stack.client.complete(r, timeout=300), requests))


def main() -> None:
    solo = {}
    for tp in ("1", "2"):
        stack = serve("--tp", tp, "--dtype", "float32")
        try:
            solo[tp] = [stack.client.complete(request(i, greedy=True), timeout=120).token_ids for i in range(8)]
            together = all_at_once(stack, [request(i) for i in range(16)])
            stats = stack.wait_idle()
            print(f"tp={tp} float32: 16 at once all finished {all(c.finish_reason for c in together)}, every block "
                  f"free {stats.kv_blocks_free == stats.kv_blocks_total}, failed {stats.failed_requests_total}",
                  flush=True)
        finally:
            print(f"tp={tp} stopped with exit code {stack.stop()}", flush=True)
    differing = [i for i, (a, b) in enumerate(zip(solo["1"], solo["2"])) if a != b]
    print(f"float32 greedy tokens at TP=2 equal TP=1's: {not differing} (differing requests: {differing})", flush=True)

    stack = serve("--tp", "2", "--dtype", "bfloat16", "--batch-invariant")
    try:
        alone = [stack.client.complete(request(i, greedy=True), timeout=120).token_ids for i in range(4)]
        crowd = [request(i, greedy=True) for i in range(4)] + [request(i) for i in range(4, 16)]
        inside = [c.token_ids for c in all_at_once(stack, crowd)[:4]]
        stats = stack.wait_idle()
        print(f"tp=2 bfloat16 --batch-invariant: alone equals inside 16 at once {alone == inside}; every block free "
              f"{stats.kv_blocks_free == stats.kv_blocks_total}, failed {stats.failed_requests_total}", flush=True)
    finally:
        print(f"batch-invariant stack stopped with exit code {stack.stop()}", flush=True)


if __name__ == "__main__":
    main()
