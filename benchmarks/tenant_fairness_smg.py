"""One flooding tenant against one light tenant: inflight's fair policy directly, and through SMG.

A replica with a small batch (so requests queue) serves a flooding tenant (a closed loop of
`--flood-concurrency` long requests) and a light tenant (one short request at a time). It reports
the light tenant's TTFT and end-to-end latency, and the flooder's throughput, under:
- direct-fcfs: gRPC straight to the replica, tenants by `x-tenant-id`, `--policy fcfs`;
- direct-fair: the same under `--policy fair`: the light tenant's requests go ahead of the queue;
- smg: through SMG, each tenant with its own API key; SMG does not forward who the caller is, so
  the replica (still `--policy fair`) sees one tenant;
- smg-rate-limited: the same with SMG's per-tenant rate limit on the flooder.

    .venv/bin/python -m benchmarks.tenant_fairness_smg --out benchmarks/results/tenant-fairness-smg-cpu
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import httpx
import numpy as np
from tokenizers import Tokenizer

from benchmarks.workload import PromptMaker
from inflight.model_store import resolve_model
from inflight.v1 import generation_pb2, generation_pb2_grpc
from tests.smg_router import SmgRouter
from tests.stack import ServedStack

MODEL = "SmolLM2-135M-Instruct"
KEYS = {"flood": "flood-key", "light": "light-key"}
Send = Callable[[str, str, int], Awaitable[tuple[float, float, int]]]  # (tenant, prompt, max tokens) -> ttft, e2e, tokens


def direct_sender(address: str) -> Send:
    channel = grpc.aio.insecure_channel(address)
    stub = generation_pb2_grpc.GenerationStub(channel)

    async def send(tenant: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
        started, first, tokens = time.perf_counter(), 0.0, 0
        request = generation_pb2.GenerateRequest(prompt=prompt, max_tokens=max_tokens, ignore_eos=True)
        async for response in stub.Generate(request, metadata=(("x-tenant-id", tenant),)):
            if response.token_ids and not first:
                first = time.perf_counter()
            tokens += len(response.token_ids)
        return first - started, time.perf_counter() - started, tokens
    return send


def smg_sender(client: httpx.AsyncClient) -> Send:
    async def send(tenant: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
        started, first, tokens = time.perf_counter(), 0.0, 0
        body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
        headers = {"authorization": f"Bearer {KEYS[tenant]}"}
        async with client.stream("POST", "/v1/completions", json=body, headers=headers) as response:
            if response.status_code != 200:
                await response.aread()
                raise RuntimeError(f"HTTP {response.status_code}")
            async for line in response.aiter_lines():
                if line.startswith("data: {") and '"text":"' in line and '"text":""' not in line:
                    first = first or time.perf_counter()
                    tokens += 1
        return first - started, time.perf_counter() - started, tokens
    return send


async def contend(send: Send, maker: PromptMaker, seconds: float, flood_concurrency: int) -> dict[str, object]:
    light: list[tuple[float, float]] = []
    flood_tokens, refused = 0, 0
    deadline = time.perf_counter() + seconds

    async def flooder() -> None:
        nonlocal flood_tokens, refused
        while time.perf_counter() < deadline:
            try:
                flood_tokens += (await send("flood", maker.make(256), 64))[2]
            except (RuntimeError, grpc.aio.AioRpcError):
                refused += 1
                await asyncio.sleep(0.2)

    async def light_client() -> None:
        await asyncio.sleep(2.0)  # the flood is up first
        while time.perf_counter() < deadline:
            ttft, e2e, _ = await send("light", maker.make(32), 16)
            light.append((ttft, e2e))
            await asyncio.sleep(0.5)

    started = time.perf_counter()
    await asyncio.gather(light_client(), *(flooder() for _ in range(flood_concurrency)))
    elapsed = time.perf_counter() - started
    ttfts, e2es = np.array([t for t, _ in light]) * 1000, np.array([e for _, e in light]) * 1000
    return {"light_requests": len(light), "light_ttft_p50_ms": float(np.median(ttfts)),
            "light_ttft_p90_ms": float(np.percentile(ttfts, 90)), "light_e2e_p50_ms": float(np.median(e2es)),
            "flood_tokens_per_s": flood_tokens / elapsed, "flood_refused": refused}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=45.0)
    parser.add_argument("--flood-concurrency", type=int, default=8)
    parser.add_argument("--max-num-seqs", type=int, default=4)
    parser.add_argument("--flood-requests-per-minute", type=int, default=12)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/tenant-fairness-smg-cpu"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model("smollm2-135m-instruct")
    maker = PromptMaker(Tokenizer.from_file(str(model_dir / "tokenizer.json")), seed=5)
    results = {}
    for policy in ("fcfs", "fair"):
        replica = ServedStack("--policy", policy, "--max-num-seqs", str(args.max_num_seqs), "--num-kv-blocks", "512",
                              log_path=args.out / f"replica-{policy}.log").wait_ready()
        try:
            async def direct() -> dict[str, object]:  # the aio channel belongs to the loop that runs it
                return await contend(direct_sender(replica.address), maker, args.seconds, args.flood_concurrency)
            results[f"direct-{policy}"] = asyncio.run(direct())
            print(f"direct-{policy}: {results[f'direct-{policy}']}", flush=True)
            if policy == "fair":
                limits = args.out / "tenant-rate-limit.yaml"
                limits.write_text("default_policy:\n  requests_per_minute: 100000\n  tokens_per_minute: 100000000\n"
                                  "tenants:\n  - tenant_key: \"auth:flood\"\n"
                                  f"    requests_per_minute: {args.flood_requests_per_minute}\n"
                                  "    tokens_per_minute: 100000000\n")
                keys = [flag for tenant, key in KEYS.items() for flag in ("--tenant-api-key", f"{tenant}:{key}")]
                keys += ["--control-plane-api-keys", "bench:bench:admin:bench-admin-key"]  # for /workers
                for name, extra in (("smg", keys), ("smg-rate-limited", [*keys, "--tenant-rate-limit-enabled",
                                                                         "--tenant-rate-limit-config", str(limits)])):
                    router = SmgRouter([replica.address], model_dir, args.out / f"{name}.log",
                                       extra_args=tuple(extra), api_key="bench-admin-key").wait_ready()
                    try:
                        async def through_smg() -> dict[str, object]:
                            async with httpx.AsyncClient(base_url=router.url, timeout=600) as client:
                                return await contend(smg_sender(client), maker, args.seconds, args.flood_concurrency)
                        results[name] = asyncio.run(through_smg())
                        print(f"{name}: {results[name]}", flush=True)
                    finally:
                        router.stop()
        finally:
            replica.stop()
    report = {"config": {k: str(v) for k, v in vars(args).items()}, "results": results}
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    lines = ["# One flooding tenant against one light tenant, directly and through SMG", "",
             f"One replica (`--max-num-seqs {args.max_num_seqs}`, so requests queue), SmolLM2-135M on this CPU. "
             f"Flood: {args.flood_concurrency} concurrent 256-token prompts, 64 tokens each. Light: one 32-token "
             f"prompt, 16 tokens, at a time. {args.seconds:.0f} s per run. SMG's rate limit: "
             f"{args.flood_requests_per_minute} flood requests per minute.", "",
             "| run | light TTFT p50 ms | light TTFT p90 ms | light e2e p50 ms | flood tok/s | flood refused |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['light_ttft_p50_ms']:.0f} | {r['light_ttft_p90_ms']:.0f} | "
                     f"{r['light_e2e_p50_ms']:.0f} | {r['flood_tokens_per_s']:.1f} | {r['flood_refused']} |")
    (args.out / "README.md").write_text("\n".join(lines) + "\n")
    print((args.out / "README.md").read_text())


if __name__ == "__main__":
    main()
