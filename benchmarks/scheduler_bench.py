"""Scheduler cost per step, and tenant fairness, with a stand-in engine that answers at once.

    python benchmarks/scheduler_bench.py

The planner is the real one; only the worker is replaced by its contract (one token per
sampled sequence, returned immediately, as the result columns the engine loop reads off the
wire), so the numbers are the scheduler's own: planning a step, and applying its result.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inflight import sampling
from inflight.v1 import worker_pb2  # noqa: E402
from scheduler.planned_step import PlannedStep  # noqa: E402
from scheduler.planner import BatchPlanner, PlannerLimits  # noqa: E402
from scheduler.policy import FairSharePolicy, FcfsPolicy, Policy  # noqa: E402
from scheduler.request import Request  # noqa: E402
from scheduler.worker_link import plan_to_proto  # noqa: E402


def request(index: int, prompt_len: int, max_new: int, tenant: str = "") -> Request:
    return Request(request_id=f"r{index}", prompt_token_ids=[5 + (index * 31 + i) % 4000 for i in range(prompt_len)],
                   max_new_tokens=max_new, sampling=sampling.resolved(seed=index),
                   stop_token_ids=frozenset({0}), arrival_order=index, tenant=tenant)


def answer(step: PlannedStep) -> worker_pb2.SampledTokens:
    """The stand-in engine's result, as the engine loop receives it off the wire: token 7 for every sequence
    the step samples."""
    slots = step.slot_ids[step.sample].tolist()
    sent = worker_pb2.SampledTokens(slot_ids=slots, token_ids=[7] * len(slots), logprobs=[0.0] * len(slots))
    return worker_pb2.SampledTokens.FromString(sent.SerializeToString())


def step_once(planner: BatchPlanner) -> PlannedStep:
    step = planner.schedule()
    result = answer(step)
    planner.update(step, result.slot_ids, result.token_ids)
    return step


def per_step_cost(num_running: int, steps: int = 200) -> dict[str, float]:
    limits = PlannerLimits(max_num_batched_tokens=max(2048, num_running), max_num_seqs=num_running,
                           max_model_len=8192, block_size=16, num_kv_blocks=num_running * 40 + 1)
    planner = BatchPlanner(limits, FcfsPolicy())
    for i in range(num_running):
        planner.add(request(i, 64, 10_000))
    while len(planner.running) < num_running or any(r.num_uncomputed_tokens > 1 for r in planner.running):
        step_once(planner)
    plan_times, update_times, encode_times = [], [], []
    for _ in range(steps):
        began = time.perf_counter()
        step = planner.schedule()
        planned = time.perf_counter()
        plan_to_proto(step, 0.0).SerializeToString()
        encoded = time.perf_counter()
        result = answer(step)  # the stand-in engine's work, not timed
        answered = time.perf_counter()
        planner.update(step, result.slot_ids, result.token_ids)
        updated = time.perf_counter()
        assert len(step.requests) == num_running
        plan_times.append(planned - began)
        encode_times.append(encoded - planned)
        update_times.append(updated - answered)
    median_us = lambda values: round(statistics.median(values) * 1e6, 1)  # noqa: E731
    return {"running": num_running, "schedule_us": median_us(plan_times), "update_us": median_us(update_times),
            "scheduler_total_us": median_us([p + u for p, u in zip(plan_times, update_times)]),
            "proto_encode_us": median_us(encode_times)}


def light_tenant_wait(policy: Policy) -> dict[str, float]:
    """A tenant floods 200 requests; another sends 5 just after. Steps until each is admitted."""
    limits = PlannerLimits(max_num_batched_tokens=512, max_num_seqs=16, max_model_len=8192, block_size=16,
                           num_kv_blocks=2000)
    planner = BatchPlanner(limits, policy)
    for i in range(200):
        planner.add(request(i, 100, 50, tenant="flood"))
    for i in range(5):
        planner.add(request(200 + i, 100, 50, tenant="light"))
    admitted_at: dict[str, list[int]] = {"flood": [], "light": []}
    step_number = 0
    while planner.has_work():
        step_number += 1
        for r in step_once(planner).admitted:
            admitted_at[r.tenant].append(step_number)
    return {"light_mean_wait_steps": statistics.fmean(admitted_at["light"]),
            "light_last_admitted_step": max(admitted_at["light"]),
            "flood_mean_wait_steps": statistics.fmean(admitted_at["flood"]), "total_steps": step_number}


def main() -> None:
    report = {
        "per_step": [per_step_cost(n) for n in (1, 64, 256, 1024)],
        "fairness": {"fcfs": light_tenant_wait(FcfsPolicy()), "fair": light_tenant_wait(FairSharePolicy())},
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
