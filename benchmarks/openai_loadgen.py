"""An asyncio load generator for OpenAI-compatible servers (vLLM): the twin of benchmarks/loadgen.py.

It streams `/v1/completions` and fills the same `RequestRecord`s as the gRPC load generator, so
`benchmarks.metrics.summarize` computes both servers' figures the same way:

    records, duration = asyncio.run(run_openai_workload("http://127.0.0.1:8000", "model", workload))

A token time is recorded for each SSE chunk that carries tokens; output tokens are the final usage's
`completion_tokens` (the per-chunk `token_ids` where the server sends no usage), and `prompt_tokens`
is what the server says it saw, so callers can check it against the workload's.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
from tqdm import tqdm

from benchmarks.loadgen import RequestRecord
from benchmarks.workload import RequestSpec, Workload


def completion_body(model: str, prompt: str | list[int], max_tokens: int, *, stream: bool,
                    ignore_eos: bool) -> dict[str, object]:
    """A greedy `/v1/completions` request that returns the token ids (vLLM's `return_token_ids`)."""
    body: dict[str, object] = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                               "ignore_eos": ignore_eos, "return_token_ids": True, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def _one(client: httpx.AsyncClient, model: str, spec: RequestSpec, record: RequestRecord) -> None:
    body = completion_body(model, spec.prompt, spec.output_tokens, stream=True, ignore_eos=True)
    streamed = 0
    usage: dict[str, int] = {}
    record.started = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                record.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
            else:
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or ():
                        tokens = len(choice.get("token_ids") or ()) or (1 if choice.get("text") else 0)
                        if tokens:
                            record.token_times.append(time.perf_counter())
                            record.tokens_per_response.append(tokens)
                            streamed += tokens
    except httpx.HTTPError as error:
        record.error = f"{type(error).__name__}: {error}"
    record.finished = time.perf_counter()
    record.output_tokens = usage.get("completion_tokens", streamed)
    record.prompt_tokens = usage.get("prompt_tokens", record.prompt_tokens)


async def run_openai_workload(base_url: str, model: str, workload: Workload,
                              progress: bool = True) -> tuple[list[RequestRecord], float]:
    """Returns each request's record and the wall time of the whole run (closed or open loop, as loadgen)."""
    records = [RequestRecord(spec.prompt_tokens) for spec in workload.requests]
    bar = tqdm(total=len(records), desc=f"{workload.name} @ {workload.offered}", disable=not progress, leave=False)
    limits = httpx.Limits(max_connections=max(workload.concurrency, len(records), 1))
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(3600.0), limits=limits) as client:
        start = time.perf_counter()

        async def tracked(index: int) -> None:
            await _one(client, model, workload.requests[index], records[index])
            bar.update()

        if workload.concurrency:
            pending = iter(range(len(records)))

            async def worker() -> None:
                for index in pending:
                    await tracked(index)

            await asyncio.gather(*(worker() for _ in range(workload.concurrency)))
        else:
            async def delayed(index: int) -> None:
                await asyncio.sleep(max(0.0, start + workload.requests[index].arrival - time.perf_counter()))
                await tracked(index)

            await asyncio.gather(*(delayed(index) for index in range(len(records))))
        duration = time.perf_counter() - start
    bar.close()
    return records, duration
