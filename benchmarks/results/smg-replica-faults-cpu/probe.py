"""Two replicas behind SMG (cache_aware), a request every 0.5 s for 60 s (32-token prompts, 8 tokens out,
streamed); at 10 s replica 0's worker rank gets FAULT (SIGSTOP: frozen, or SIGKILL: dead). Prints each
request sent from 8 s on: the replica SMG named, the HTTP status, TTFT and total time.

    FAULT=SIGSTOP .venv/bin/python benchmarks/results/smg-replica-faults-cpu/probe.py OUT
"""
import sys, os, json, asyncio, time, signal
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import httpx
from inflight.model_store import resolve_model
from tests.smg_router import SmgRouter
from tests.stack import ServedStack
from tests.processes import worker_ranks
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
model_dir = resolve_model("smollm2-135m-instruct")
reps = [ServedStack("--cpu-threads", "1", log_path=out / f"rep{i}.log") for i in range(2)]
for r in reps: r.wait_ready()
router = SmgRouter([r.address for r in reps], model_dir, out / "smg.log", policy="cache_aware").wait_ready()
names = {f"grpc://{r.address}": f"r{i}" for i, r in enumerate(reps)}
results = []
async def one(client, k, start):
    await asyncio.sleep(k * 0.5)
    t0 = time.perf_counter()
    body = {"model": "SmolLM2-135M-Instruct", "prompt": f"Request {k}: tell me about the number {k}.", "max_tokens": 8, "temperature": 0, "stream": True}
    first = None; status = None; worker = None; err = ""
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            status = resp.status_code; worker = names.get(resp.headers.get("x-smg-routed-worker-id"), resp.headers.get("x-smg-routed-worker-id"))
            async for line in resp.aiter_lines():
                if line.startswith("data: {") and first is None and json.loads(line[6:]).get("choices"):
                    first = time.perf_counter()
                if "error" in line: err = line[:150]
    except Exception as e:
        err = repr(e)[:150]
    results.append({"sent": round(t0 - start, 1), "worker": worker, "status": status, "ttft": round(first - t0, 2) if first else None, "total": round(time.perf_counter() - t0, 2), "err": err})
async def main():
    async with httpx.AsyncClient(base_url=router.url, timeout=120) as client:
        start = time.perf_counter()
        tasks = [asyncio.create_task(one(client, k, start)) for k in range(120)]
        await asyncio.sleep(10)
        ranks = worker_ranks(reps[0].process.pid)
        sig = getattr(signal, os.environ.get("FAULT", "SIGSTOP")); os.kill(ranks[0], sig); print(f"{sig.name} to replica 0 rank 0 at 10 s", flush=True)
        await asyncio.gather(*tasks)
asyncio.run(main())
for r in sorted(results, key=lambda r: r["sent"]):
    if r["sent"] >= 8: print(r)
bad = [r for r in results if r["sent"] >= 10 and (r["ttft"] is None or r["ttft"] > 3)]
print("after the fault:", sum(1 for r in results if r["sent"] >= 10 and r["worker"] == "r0"), "sent to r0;", len(bad), "slow (>3 s) or failed of", sum(1 for r in results if r["sent"] >= 10))
router.stop()
for r in reps: r.stop()
