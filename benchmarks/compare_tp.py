"""Compare the greedy tokens and decode times of tp_decode.py reports (tp1_*.json vs tp2_*.json)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def main(folder: str) -> None:
    out = Path(folder)
    summary = {}
    for dtype in ("fp32", "bf16"):
        one, two = out / f"tp1_{dtype}.json", out / f"tp2_{dtype}.json"
        if not (one.exists() and two.exists()):
            continue
        a, b = json.loads(one.read_text()), json.loads(two.read_text())
        summary[dtype] = {
            "greedy_tokens_identical": a["greedy_tokens"] == b["greedy_tokens"],
            "first_difference_per_prompt": [first_difference(x, y) for x, y in zip(a["greedy_tokens"], b["greedy_tokens"])],
            "tokens_per_prompt": len(a["greedy_tokens"][0]),
            "weight_bytes_per_rank": {"tp1": a["weight_bytes_per_rank"], "tp2": b["weight_bytes_per_rank"]},
            "decode_ms": {"tp1": a["decode"], "tp2": b["decode"]},
            "gpu": a["gpu"], "torch": a["torch"],
        }
    text = json.dumps(summary, indent=1)
    (out / "summary.json").write_text(text)
    print(text)


if __name__ == "__main__":
    main(sys.argv[1])
