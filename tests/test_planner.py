"""The batch planner and block allocator under random arrivals, steps, finishes and aborts.

The worker is replaced by its contract — one sampled token per sampled sequence — so the
planner's own bookkeeping is what is tested: invariants after every event, no leak at the end.
"""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from inflight.v1 import common_pb2
from scheduler.planner import BatchPlanner, PlannerLimits
from scheduler.policy import FcfsPolicy, PriorityPolicy
from scheduler.request import Request, RequestStatus

EOS = 0


def make_request(index: int, prompt_len: int, max_new: int, priority: int = 0) -> Request:
    return Request(
        request_id=f"r{index}", prompt_token_ids=[5 + (index + i) % 50 for i in range(prompt_len)],
        max_new_tokens=max_new, sampling=common_pb2.SamplingParams(seed=index),
        stop_token_ids=frozenset({EOS}), arrival_order=index, priority=priority,
    )


def run_step(planner: BatchPlanner, rng: random.Random, eos_rate: float = 0.02):
    step = planner.schedule()
    total = step.num_tokens
    assert total <= planner.limits.max_num_batched_tokens
    slots = [c.request.slot_id for c in step.chunks]
    assert len(set(slots)) == len(slots)
    for chunk in step.chunks:
        request = chunk.request
        assert (len(request.block_ids)) * planner.limits.block_size >= chunk.num_computed_tokens + len(chunk.token_ids)
    sampled = {c.request.slot_id: (EOS if rng.random() < eos_rate else 7) for c in step.chunks if c.sample}
    return step, planner.update(step, sampled)


limits_strategy = st.builds(
    PlannerLimits,
    max_num_batched_tokens=st.integers(8, 96),
    max_num_seqs=st.integers(1, 8),
    max_model_len=st.just(512),
    block_size=st.sampled_from([1, 4, 16]),
    num_kv_blocks=st.integers(12, 80),
)
events_strategy = st.lists(
    st.one_of(
        st.tuples(st.just("arrive"), st.integers(1, 60), st.integers(1, 40), st.integers(0, 3)),
        st.tuples(st.just("step"), st.integers(1, 4)),
        st.tuples(st.just("abort"), st.integers(0, 30)),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(limits=limits_strategy, events=events_strategy, use_priority=st.booleans(), seed=st.integers(0, 2**16))
def test_invariants_hold_after_every_event_and_nothing_leaks(limits, events, use_priority, seed):
    planner = BatchPlanner(limits, PriorityPolicy() if use_priority else FcfsPolicy())
    rng = random.Random(seed)
    arrived: list[Request] = []
    for event in events:
        if event[0] == "arrive":
            _, prompt_len, max_new, priority = event
            if planner.blocks_needed_alone(prompt_len, max_new) > planner.allocator.num_usable:
                continue  # the scheduler refuses these at admission
            request = make_request(len(arrived), prompt_len, max_new, priority)
            arrived.append(request)
            planner.add(request)
        elif event[0] == "step":
            for _ in range(event[1]):
                if planner.has_work():
                    run_step(planner, rng)
        elif arrived:
            planner.abort(arrived[event[1] % len(arrived)].request_id)
        planner.check_invariants()
    # Everything that arrived finishes: no livelock, whatever the cache size.
    for _ in range(10_000):
        if not planner.has_work():
            break
        run_step(planner, rng)
        planner.check_invariants()
    assert not planner.has_work()
    assert all(r.status is RequestStatus.FINISHED for r in arrived)
    assert planner.allocator.num_free == planner.allocator.num_usable
    for request in arrived:
        if request.finish_reason == common_pb2.FINISH_REASON_LENGTH:
            assert len(request.output_token_ids) == request.max_new_tokens


def test_running_decodes_go_first_and_a_long_prompt_is_chunked_to_the_budget():
    limits = PlannerLimits(max_num_batched_tokens=32, max_num_seqs=4, max_model_len=512, block_size=16, num_kv_blocks=64)
    planner = BatchPlanner(limits, FcfsPolicy())
    short = make_request(0, 10, 50)
    planner.add(short)
    run_step(planner, random.Random(0), eos_rate=0)
    long = make_request(1, 100, 5)
    planner.add(long)
    step = planner.schedule()
    assert [(c.request.request_id, len(c.token_ids), c.sample) for c in step.chunks] == [("r0", 1, True), ("r1", 31, False)]


def test_preemption_takes_the_newest_and_it_resumes_from_its_tokens():
    limits = PlannerLimits(max_num_batched_tokens=64, max_num_seqs=4, max_model_len=512, block_size=4, num_kv_blocks=9)
    planner = BatchPlanner(limits, FcfsPolicy())
    first, second = make_request(0, 12, 20), make_request(1, 12, 20)
    planner.add(first)
    planner.add(second)
    rng = random.Random(0)
    while planner.stats.preemptions_total == 0:
        run_step(planner, rng, eos_rate=0)
        planner.check_invariants()
    assert second.status is RequestStatus.WAITING and second.num_computed_tokens == 0 and second.block_ids == []
    assert first.status is RequestStatus.RUNNING
    generated_before = list(second.output_token_ids)
    assert generated_before  # it had produced tokens before it was preempted
    while True:
        step = planner.schedule()
        resumed = next((c for c in step.chunks if c.request is second), None)
        if resumed is not None:
            break
        planner.update(step, {c.request.slot_id: 7 for c in step.chunks if c.sample})
    assert second in step.admitted
    assert resumed.num_computed_tokens == 0  # recomputed from scratch ...
    assert resumed.token_ids == (second.prompt_token_ids + generated_before)[: len(resumed.token_ids)]  # ... same tokens


def test_abort_while_step_in_flight_frees_blocks_and_drops_the_result():
    limits = PlannerLimits(max_num_batched_tokens=64, max_num_seqs=4, max_model_len=512, block_size=16, num_kv_blocks=16)
    planner = BatchPlanner(limits, FcfsPolicy())
    request = make_request(0, 20, 10)
    planner.add(request)
    step = planner.schedule()
    planner.abort(request.request_id)
    assert planner.allocator.num_free == planner.allocator.num_usable
    outputs = planner.update(step, {0: 7})
    assert outputs == [] and request.output_token_ids == []
    assert request.finish_reason == common_pb2.FINISH_REASON_ABORT
    next_step = planner.schedule()
    assert next_step.released_slot_ids == [0] and next_step.chunks == []
    planner.check_invariants()
