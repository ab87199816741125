"""Where a CPU step's time goes, across gateway, scheduler and worker: py-spy on all three under load.

    python benchmarks/profile_stack.py --concurrency 1          # needs py-spy (pip install py-spy)
    python benchmarks/profile_stack.py --concurrency 16 --dtype bfloat16

Starts the stack, keeps `concurrency` fixed 128/64 requests in flight, samples each process for
`--seconds`, and prints each process's CPU use and the functions its busy threads were in.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import psutil  # noqa: E402

from benchmarks.loadgen import run_workload  # noqa: E402
from benchmarks.workload import PromptMaker, Workload, fixed_lengths  # noqa: E402
from inflight.model_store import DEFAULT_MODEL, resolve_model  # noqa: E402
from services.text.codec import TextCodec  # noqa: E402
from tests.stack import ServedStack  # noqa: E402

ROLES = {"gateway": "services.gateway", "scheduler": "-m scheduler", "worker": "-m worker"}


def stack_processes(launcher_pid: int) -> dict[str, psutil.Process]:
    found = {}
    for process in psutil.Process(launcher_pid).children(recursive=True):
        command = " ".join(process.cmdline())
        for role, marker in ROLES.items():
            if marker in command and "mpiexec" not in command and "inflight.process" not in command:
                found[role if role not in found else f"{role}-{sum(r.startswith(role) for r in found)}"] = process
    return found


def summarize(raw: Path, top: int) -> list[str]:
    """Share of busy samples per function (inclusive), from py-spy's raw (collapsed) output."""
    total, inclusive = 0, collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        total += int(count)
        for frame in {frame.split(" (")[0] for frame in stack.split(";")}:
            inclusive[frame] += int(count)
    skip = ("Thread.", "_bootstrap", "_worker", "_WorkItem", "_run_module", "_run_code", "<module>", "Runner.",
            "BaseEventLoop.", "Handle._run", "run (")
    rows = [(name, n) for name, n in inclusive.most_common() if not name.startswith(skip)][:top]
    return [f"    {n / max(1, total) * 100:5.1f}%  {name}" for name, n in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--top", type=int, default=18)
    parser.add_argument("--idle", action="store_true", help="sample idle threads too (time waiting shows)")
    parser.add_argument("--prompt-tokenizer", default="", help="folder with tokenizer.json for the prompts "
                        f"(default: {DEFAULT_MODEL}'s); the stack's own flags follow the known ones")
    args, stack_args = parser.parse_known_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    codec = TextCodec(Path(args.prompt_tokenizer) if args.prompt_tokenizer else resolve_model(DEFAULT_MODEL))
    maker = PromptMaker(codec.tokenizer, seed=0)
    stack = ServedStack("--log-level", "warning", "--no-prefix-caching", "--dtype", args.dtype,
                        *stack_args).wait_ready(timeout=600)
    try:
        processes = stack_processes(stack.process.pid)
        processes["client"] = psutil.Process()  # this process: the load generator's gRPC client
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                requests = fixed_lengths(maker, args.concurrency, 128, 64)
                asyncio.run(run_workload(stack.address, Workload("load", requests, concurrency=args.concurrency), False))

        threading.Thread(target=load, daemon=True).start()
        time.sleep(3)
        out = Path(tempfile.mkdtemp(prefix="profile-stack-"))
        before = {role: p.cpu_times() for role, p in processes.items()}
        spies = {role: subprocess.Popen([py_spy, "record", "--rate", "200", "--duration", str(int(args.seconds)),
                                         "--format", "raw", "--nonblocking", *(["--idle"] if args.idle else []), "--output", str(out / f"{role}.txt"),
                                         "--pid", str(p.pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for role, p in processes.items()}
        for spy in spies.values():
            spy.wait()
        after = {role: p.cpu_times() for role, p in processes.items()}
        stop.set()
        print(f"concurrency {args.concurrency}, {args.seconds:.0f} s sampled, dtype {args.dtype}")
        for role in processes:
            cpu = sum(after[role][:2]) - sum(before[role][:2])
            print(f"{role}: {cpu / args.seconds:.2f} CPUs busy (all threads)")
            raw = out / f"{role}.txt"
            if raw.exists():
                print("\n".join(summarize(raw, args.top)))
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
