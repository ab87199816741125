"""Baselines measured in the same run, on the same weights and workload as the stack.

1. engine alone: the real planner and engine in one process, no gRPC, no separate scheduler; stepped one after
   another, or pipelined (the next step launched before the last one's tokens are read);
2. static batching through the same engine: a batch runs to completion before the next starts;
3. Hugging Face transformers `generate`, batched with left padding.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from inflight import sampling
from inflight.v1 import common_pb2
from scheduler.planned_step import PlannedStep
from scheduler.planner import BatchPlanner, PlannerLimits
from scheduler.policy import FcfsPolicy
from scheduler.request import Request
from scheduler.worker_link import plan_to_proto
from worker.codec import step_from_proto
from worker.config import WorkerConfig
from worker.parallel import Collectives, ShardPlan
from worker.step import PendingStep
from worker.torch_engine.engine import TorchEngine


@dataclass(frozen=True)
class TokenizedRequest:
    prompt_ids: list[int]
    output_tokens: int


@dataclass(frozen=True)
class BaselineResult:
    name: str
    output_tokens: int
    seconds: float
    steps: int = 0

    @property
    def output_throughput_tps(self) -> float:
        return self.output_tokens / self.seconds


class InProcessEngine:
    """The worker's engine and the scheduler's planner, driven directly."""

    def __init__(self, model: str, device: str, dtype: str, num_kv_blocks: int, max_num_batched_tokens: int,
                 max_num_seqs: int) -> None:
        config = WorkerConfig(model=model, listen="", device=device, dtype=dtype, block_size=16,
                              num_kv_blocks=num_kv_blocks, kv_cache_gb=0.0, max_num_batched_tokens=max_num_batched_tokens,
                              max_num_seqs=max_num_seqs, max_model_len=0, seed=0, log_level="warning")
        self.engine = TorchEngine(config, ShardPlan(0, 1), Collectives(1))
        self.engine.warmup()
        d = self.engine.describe()
        self.limits = PlannerLimits(d.max_num_batched_tokens, d.max_num_seqs, d.max_model_len, d.block_size,
                                    d.num_kv_blocks)

    def _request(self, index: int, spec: TokenizedRequest) -> Request:
        return Request(request_id=f"b{index}", prompt_token_ids=spec.prompt_ids, max_new_tokens=spec.output_tokens,
                       sampling=sampling.resolved(seed=index), stop_token_ids=frozenset(),
                       arrival_order=index)

    def _run(self, planner: BatchPlanner, refill: Callable[[], None], pipelined: bool) -> None:
        """Step until the planner has no work, calling refill after each result. Pipelined: the next step is
        launched before the last one's tokens are read (two in flight, as the stack's overlap scheduling)."""
        depth = 2 if pipelined else 1
        in_flight: deque[tuple[PlannedStep, PendingStep]] = deque()
        refill()
        while planner.has_work() or in_flight:
            launched = False
            if planner.has_work() and len(in_flight) < depth and not (in_flight and in_flight[-1][0].short_of_blocks):
                planned = planner.schedule(in_flight=bool(in_flight))
                if planned.requests:
                    in_flight.append((planned, self.engine.launch(step_from_proto(plan_to_proto(planned, 0.0)))))
                    launched = True
            if in_flight and (len(in_flight) == depth or not launched):
                planned, pending = in_flight.popleft()
                output = pending.result()
                planner.update(planned, output.slot_ids, output.token_ids)
                refill()

    def continuous(self, requests: list[TokenizedRequest], concurrency: int, pipelined: bool = False) -> BaselineResult:
        """Closed loop: a new request joins as soon as one finishes, as the stack's clients do."""
        planner = BatchPlanner(self.limits, FcfsPolicy(), enable_prefix_caching=False)
        pending = list(enumerate(requests))
        live: list[Request] = []

        def refill() -> None:
            live[:] = [r for r in live if r.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED]
            while pending and len(live) < concurrency:
                index, spec = pending.pop(0)
                live.append(self._request(index, spec))
                planner.add(live[-1])

        start = time.perf_counter()
        self._run(planner, refill, pipelined)
        self._sync()
        name = "engine alone, pipelined" if pipelined else "engine alone (continuous batching)"
        return BaselineResult(name, sum(r.output_tokens for r in requests), time.perf_counter() - start,
                              planner.stats.steps_total)

    def static(self, requests: list[TokenizedRequest], batch_size: int) -> BaselineResult:
        """Collect a batch, run it until its longest request ends, then take the next."""
        planner = BatchPlanner(self.limits, FcfsPolicy(), enable_prefix_caching=False)
        start = time.perf_counter()
        for first in range(0, len(requests), batch_size):
            batch = requests[first : first + batch_size]
            for offset, spec in enumerate(batch):
                planner.add(self._request(first + offset, spec))
            self._run(planner, lambda: None, pipelined=False)
        self._sync()
        return BaselineResult("static batching (same engine)", sum(r.output_tokens for r in requests),
                              time.perf_counter() - start, planner.stats.steps_total)

    def _sync(self) -> None:
        if self.engine.device.type == "cuda":
            torch.cuda.synchronize()

    def close(self) -> None:
        del self.engine
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def hf_model(model: str, device: str, dtype: torch.dtype):  # type: ignore[no-untyped-def]
    """transformers' LlamaForCausalLM with exactly the weights the engine uses."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if not model.startswith("random:"):
        return LlamaForCausalLM.from_pretrained(model, dtype=dtype).to(device).eval()
    from worker.torch_engine.random_models import _weight_shapes, random_model

    config, weights = random_model(model.removeprefix("random:"), 0, torch.device(device), dtype)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            hf = LlamaForCausalLM(LlamaConfig(**config.to_hf_dict()))
    finally:
        torch.set_default_dtype(default_dtype)
    for name in _weight_shapes(config):  # one tensor at a time: no second copy of the model
        hf.get_parameter(name).data.copy_(weights.get(name))
    hf.tie_weights()
    return hf.eval()


def hf_generate(model: str, device: str, dtype: torch.dtype, requests: list[TokenizedRequest],
                batch_size: int) -> BaselineResult:
    """Batched greedy generate with left padding; every request in a batch runs to the longest."""
    hf = hf_model(model, device, dtype)
    start = time.perf_counter()
    with torch.no_grad():
        for first in range(0, len(requests), batch_size):
            batch = requests[first : first + batch_size]
            width = max(len(r.prompt_ids) for r in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for row, r in enumerate(batch):
                ids[row, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
                mask[row, width - len(r.prompt_ids):] = 1
            new_tokens = max(r.output_tokens for r in batch)
            hf.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del hf
    return BaselineResult("transformers generate (batched)", sum(r.output_tokens for r in requests), seconds)
