"""The open-loop run behind decisions.txt: 3 replicas behind SMG with its cache trace on, 72 unique
624-token prompts at 0.9 requests/s; each request's arrival, TTFT and the replica SMG named.

    .venv/bin/python benchmarks/results/smg-replicas-cpu-unique-flags/open-loop-trace/probe.py cache_aware OUT
    .venv/bin/python -m benchmarks.smg_trace OUT/smg.log
"""
import sys, os, json, asyncio, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[4]))
os.environ["SMG_CACHE_TRACE"] = "1"; os.environ["SMG_CACHE_TRACE_SAMPLE"] = "1"
import httpx
from tokenizers import Tokenizer
from benchmarks.smg_replicas import unique, MODEL
from benchmarks.openai_loadgen import completion_body
from benchmarks.workload import PromptMaker, with_poisson_arrivals
from inflight.model_store import resolve_model
from tests.smg_router import SmgRouter
from tests.stack import ServedStack
policy = sys.argv[1]
out = Path(sys.argv[2]); out.mkdir(parents=True, exist_ok=True)
model_dir = resolve_model("smollm2-135m-instruct")
tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
reps = [ServedStack("--num-kv-blocks", "241", "--cpu-threads", "1", log_path=out / f"rep{i}.log") for i in range(3)]
for r in reps: r.wait_ready()
name, *flags = policy.split()
router = SmgRouter([r.address for r in reps], model_dir, out / "smg.log", policy=name, extra_args=tuple(flags)).wait_ready()
maker = PromptMaker(tok, seed=100)
specs = with_poisson_arrivals(unique(maker, 72, 624, 16), 0.9, seed=0)
results = []
async def one(client, spec, start):
    await asyncio.sleep(max(0, start + spec.arrival - time.perf_counter()))
    t0 = time.perf_counter(); first = None; cid = None; worker = None
    async with client.stream("POST", "/v1/completions", json=completion_body(MODEL, spec.prompt, 16, stream=True, ignore_eos=True)) as resp:
        worker = resp.headers.get("x-smg-routed-worker-id")
        async for line in resp.aiter_lines():
            if line.startswith("data: {"):
                c = json.loads(line[6:]); cid = cid or c.get("id")
                if first is None and c.get("choices"): first = time.perf_counter()
    results.append({"arrival": t0 - start, "ttft": first - t0, "id": cid, "worker": worker[-5:] if worker else None})
async def main():
    async with httpx.AsyncClient(base_url=router.url, timeout=600, limits=httpx.Limits(max_connections=100)) as client:
        start = time.perf_counter()
        await asyncio.gather(*(one(client, s, start) for s in specs))
asyncio.run(main())
json.dump(sorted(results, key=lambda r: r["arrival"]), open(out / "requests.json", "w"), indent=0)
t = sorted(r["ttft"] for r in results)
print(policy, "p50 %.2f p90 %.2f max %.2f" % (t[len(t)//2], t[int(.9*len(t))], t[-1]))
router.stop()
for r in reps: r.stop()
