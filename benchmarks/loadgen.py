"""An asyncio gRPC load generator: replays a workload against a running gateway."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from dataclasses import dataclass, field

import grpc
from tqdm import tqdm

from benchmarks.workload import RequestSpec, Workload
from inflight.v1 import generation_pb2, generation_pb2_grpc


@dataclass
class RequestRecord:
    prompt_tokens: int
    output_tokens: int = 0
    started: float = 0.0
    token_times: list[float] = field(default_factory=list)  # arrival time of each response carrying tokens
    tokens_per_response: list[int] = field(default_factory=list)
    finished: float = 0.0
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.started

    @property
    def e2e(self) -> float:
        return self.finished - self.started

    @property
    def tpot(self) -> float:
        """Mean time per output token after the first."""
        return (self.finished - self.token_times[0]) / max(1, self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


async def _one(stub: generation_pb2_grpc.GenerationStub, spec: RequestSpec, record: RequestRecord) -> None:
    request = generation_pb2.GenerateRequest(prompt=spec.prompt, max_tokens=spec.output_tokens, ignore_eos=True)
    record.started = time.perf_counter()
    try:
        async for response in stub.Generate(request, timeout=3600):
            if response.token_ids:
                record.token_times.append(time.perf_counter())
                record.tokens_per_response.append(len(response.token_ids))
                record.output_tokens += len(response.token_ids)
    except grpc.aio.AioRpcError as error:
        record.error = error.code().name
    record.finished = time.perf_counter()


async def run_workload(address: str, workload: Workload, progress: bool = True,
                       channels: int = 1) -> tuple[list[RequestRecord], float]:
    """Returns each request's record and the wall time of the whole run. channels: connections to spread the
    requests over (each its own, as separate clients have; a server of several processes on one port sees
    them spread by the kernel)."""
    records = [RequestRecord(spec.prompt_tokens) for spec in workload.requests]
    bar = tqdm(total=len(records), desc=f"{workload.name} @ {workload.offered}", disable=not progress, leave=False)
    opened = [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
              for _ in range(channels)]
    stubs = [generation_pb2_grpc.GenerationStub(channel) for channel in opened]
    try:
        start = time.perf_counter()

        async def tracked(index: int, stub: generation_pb2_grpc.GenerationStub) -> None:
            await _one(stub, workload.requests[index], records[index])
            bar.update()

        if workload.concurrency:
            queue: asyncio.Queue[int] = asyncio.Queue()
            for index in range(len(records)):
                queue.put_nowait(index)

            async def worker(stub: generation_pb2_grpc.GenerationStub) -> None:  # a client with its connection
                while not queue.empty():
                    await tracked(queue.get_nowait(), stub)

            await asyncio.gather(*(worker(stubs[i % channels]) for i in range(workload.concurrency)))
        else:
            async def delayed(index: int) -> None:
                await asyncio.sleep(max(0.0, start + workload.requests[index].arrival - time.perf_counter()))
                await tracked(index, stubs[index % channels])

            await asyncio.gather(*(delayed(index) for index in range(len(records))))
        duration = time.perf_counter() - start
    finally:
        for channel in opened:
            await channel.close()
    bar.close()
    return records, duration


def _run_share(address: str, workload: Workload, start_at: float, channels: int) -> tuple[list[RequestRecord], float]:
    """One client process's share, started at start_at (wall clock, shared by the processes): its records, and
    when it ended."""
    time.sleep(max(0.0, start_at - time.time()))
    records, _ = asyncio.run(run_workload(address, workload, False, channels))
    return records, time.time()


def run_workload_in_processes(address: str, workload: Workload, processes: int,
                              channels: int = 1) -> tuple[list[RequestRecord], float]:
    """A closed-loop workload split across client processes (each with `channels` connections of its own, its
    share of the requests and of the concurrency), so that one Python client's event loop does not cap what
    the server can serve.
    The processes start together once all are up. Returns every request's record (in no particular order)
    and the wall time from the common start to the last end."""
    if processes <= 1:
        return asyncio.run(run_workload(address, workload, False, channels))
    assert workload.concurrency >= processes, "each client process needs at least one request in flight"
    shares = [Workload(workload.name, workload.requests[i::processes], concurrency=workload.concurrency // processes)
              for i in range(processes)]
    context = multiprocessing.get_context("spawn")
    with context.Pool(processes) as pool:
        pool.map(time.sleep, [0.0] * processes)  # every process is up (spawned and imported) before the clock starts
        start_at = time.time() + 0.5
        results = pool.starmap(_run_share, [(address, share, start_at, channels) for share in shares])
    records = [record for share_records, _ in results for record in share_records]
    return records, max(end for _, end in results) - start_at
