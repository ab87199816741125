"""The benchmark report: JSON, a markdown table, and PNG plots under benchmarks/results/."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from benchmarks.loadgen import RequestRecord


def latencies(runs: dict[str, list[RequestRecord]]) -> dict[str, dict[str, list[float]]]:
    """Per-request latencies (seconds) of each run, kept in the report so plots can be redrawn anywhere."""
    result = {}
    for label, records in runs.items():
        done = [r for r in records if r.ok and r.token_times]
        result[label] = {"ttft": [r.ttft for r in done], "tpot": [r.tpot for r in done if r.output_tokens > 1],
                         "e2e": [r.e2e for r in done]}
    return result


def plot(folder: Path) -> None:
    report = json.loads((folder / "report.json").read_text())
    plot_latency_cdfs(report["latencies"], folder / "latency_cdf.png")
    rate_runs = [run for run in report["stack"] if run["offered"].endswith("req/s")]
    assert len(rate_runs) == len(report["load_curve_rates"])
    plot_load_curve(report["load_curve_rates"], [run["summary"] for run in rate_runs], folder / "load_curve.png")


def plot_latency_cdfs(runs: dict[str, dict[str, list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    for label, values_by_kind in runs.items():
        for axis, kind in zip(axes, ("ttft", "tpot", "e2e")):
            values = values_by_kind[kind]
            if values:
                ordered = np.sort(np.asarray(values) * 1000)
                axis.plot(ordered, np.arange(1, len(ordered) + 1) / len(ordered), label=label)
    for axis, title in zip(axes, ("time to first token", "time per output token", "end-to-end latency")):
        axis.set_title(title)
        axis.set_xlabel("ms")
        axis.set_ylabel("fraction of requests")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_load_curve(rates: list[float], summaries: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(rates, [s["output_throughput_tps"] for s in summaries], marker="o", label="output tokens/s")
    left.plot(rates, [s["goodput_rps"] * 100 for s in summaries], marker="s", label="goodput x100 (req/s)")
    left.set_xlabel("offered load (requests/s)")
    left.set_title("throughput against offered load")
    left.legend()
    right.plot(rates, [s["ttft_ms"]["p99"] for s in summaries], marker="o", color="tab:red")
    right.set_xlabel("offered load (requests/s)")
    right.set_ylabel("ms")
    right.set_title("p99 time to first token against offered load")
    for axis in (left, right):
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def markdown(report: dict) -> str:
    lines = [f"# Serving benchmark — {report['meta']['label']}", ""]
    meta = report["meta"]
    lines += [f"- {key}: {value}" for key, value in meta.items() if key != "label"] + [""]
    lines += ["## The stack", "",
              "| scenario | offered | req/s | out tok/s | goodput req/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | ITL p50 ms | E2E p50 / p99 ms |",
              "|---|---|---|---|---|---|---|---|---|"]
    for run in report["stack"]:
        s = run["summary"]
        lines.append(f"| {run['workload']} | {run['offered']} | {s['request_throughput_rps']:.2f} | "
                     f"{s['output_throughput_tps']:.1f} | {s['goodput_rps']:.2f} | {s['ttft_ms']['p50']:.0f} / "
                     f"{s['ttft_ms']['p99']:.0f} | {s['tpot_ms']['p50']:.1f} / {s['tpot_ms']['p99']:.1f} | "
                     f"{s['itl_ms']['p50']:.1f} | {s['e2e_ms']['p50']:.0f} / {s['e2e_ms']['p99']:.0f} |")
    lines += ["", "## Baselines (same weights, same requests, one run)"]
    for table in report["baselines"]:
        lines += ["", f"Workload: {table['workload']}. Ratio: the stack's output tokens/s over the row's.", "",
                  "| run | output tokens | seconds | out tok/s | ratio |", "|---|---|---|---|---|"]
        for row in table["rows"]:
            lines.append(f"| {row['name']} | {row['output_tokens']} | {row['seconds']:.2f} | "
                         f"{row['output_throughput_tps']:.1f} | {row['ratio']} |")
        lines += [""] + [f"- {note}" for note in table["notes"]]
    if "decode_floor" in report:
        f = report["decode_floor"]
        lines += ["", "## Batch-1 decode step against the memory floor", "",
                  f"- measured device memory bandwidth: {f['bandwidth_gb_s']:.0f} GB/s (copy, bytes read + written)",
                  f"- weight bytes a batch-1 step reads (of experts, only those a token routes to): {f['weight_bytes'] / 1e9:.2f} GB → floor {f['floor_ms']:.2f} ms per decode step",
                  f"- measured batch-1 decode step (engine alone): {f['step_ms']:.2f} ms → {f['floor_ms'] / f['step_ms']:.0%} of the floor"]
    lines += ["", "Plots: `latency_cdf.png`, `load_curve.png`.", ""]
    return "\n".join(lines)


def write(report: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(report, indent=1))
    (folder / "report.md").write_text(markdown(report))


if __name__ == "__main__":
    plot(Path(sys.argv[1]))
