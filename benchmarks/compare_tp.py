"""Sum up gpu_tp.sh's reports: fp32 greedy tokens at TP=1 against TP=2, decode steps and speedups, all-reduce cost.

    python benchmarks/compare_tp.py OUT_FOLDER     # writes OUT_FOLDER/summary.json and prints it
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def main(folder: str) -> None:
    out = Path(folder)
    summary: dict[str, object] = {}
    one = load(out / "tp1_fp32.json")
    for name in ("tp2", "tp2fused"):
        two = load(out / f"{name}_fp32.json")
        if one and two:
            prefix = "fp32" if name == "tp2" else f"{name}_fp32"
            summary[f"{prefix}_greedy_tokens_identical"] = one["greedy_tokens"] == two["greedy_tokens"]
            summary[f"{prefix}_first_difference_per_prompt"] = [first_difference(a, b) for a, b in
                                                                zip(one["greedy_tokens"], two["greedy_tokens"])]
    # tp2alone: one rank of TP=2 with no all-reduce, on one GPU (tp_decode.py --rank-alone 2); its speedup is
    # TP=2's ceiling were the all-reduces free
    runs = {name: load(out / f"{name}_bf16.json") for name in ("tp1", "tp2", "tp2nccl", "tp2fused", "tp2alone")}
    if runs["tp1"]:
        summary["gpu"], summary["torch"] = runs["tp1"]["gpu"], runs["tp1"]["torch"]
        steps = []
        for row in runs["tp1"]["decode"]:
            key = (row["batch"], row["context"])
            entry: dict[str, object] = {"batch": key[0], "context": key[1], "tp1_ms": round(row["median_ms"], 3),
                                        "tp1_pipelined_ms": round(row["pipelined_ms"], 3)}
            for name in ("tp2", "tp2nccl", "tp2fused", "tp2alone"):
                match = [r for r in (runs[name] or {}).get("decode", []) if (r["batch"], r["context"]) == key]
                if match:
                    entry[f"{name}_ms"] = round(match[0]["median_ms"], 3)
                    entry[f"{name}_speedup"] = round(row["median_ms"] / match[0]["median_ms"], 3)
                    entry[f"{name}_pipelined_ms"] = round(match[0]["pipelined_ms"], 3)
                    entry[f"{name}_pipelined_speedup"] = round(row["pipelined_ms"] / match[0]["pipelined_ms"], 3)
            steps.append(entry)
        summary["bf16_decode"] = steps
        summary["floor_ms_per_rank"] = {name: [f["floor_ms"] for f in run["floor_per_rank"]]
                                        for name, run in runs.items() if run and run.get("floor_per_rank")}
    reduce = load(out / "all_reduce.json")
    if reduce:
        layers = {"tokens": [], "nccl_us_per_layer": [], "peer_us_per_layer": []}
        for row in reduce["sizes"]:  # two all-reduces per layer; the peer path takes the faster of its two kernels
            peer = min(row.get(k, float("inf")) for k in ("one_shot_graph_us", "two_shot_graph_us"))
            layers["tokens"].append(row["tokens"])
            layers["nccl_us_per_layer"].append(round(2 * row["nccl_graph_us"], 1))
            layers["peer_us_per_layer"].append(round(2 * peer, 1))
        summary["all_reduce_per_layer_in_graphs"] = layers
        summary["all_reduce_bit_for_bit_nccl"] = all(v for row in reduce["sizes"] for k, v in row.items()
                                                     if k.endswith("_equals_nccl"))
    fused = load(out / "peer_add_norm.json")
    if fused:
        summary["peer_add_norm_bits_equal"] = all(fused["bits"].values())
        summary["peer_add_norm_us_per_call"] = fused.get("per_call", [])
    text = json.dumps(summary, indent=1)
    (out / "summary.json").write_text(text)
    print(text)


if __name__ == "__main__":
    main(sys.argv[1])
