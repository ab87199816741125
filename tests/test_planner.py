"""The batch planner and block allocator under random arrivals, steps, finishes and aborts.

The worker is replaced by its contract — one sampled token per sampled sequence — so the
planner's own bookkeeping is what is tested: invariants after every event, no leak at the end.
"""

from __future__ import annotations

import random
import zlib
from collections import deque

from hypothesis import given, settings
from hypothesis import strategies as st

from inflight import sampling
from inflight.step_contract import PREVIOUS_TOKEN
from inflight.v1 import common_pb2
from scheduler.planned_step import PlannedStep, StepOutputs
from scheduler.planner import BatchPlanner, PlannerLimits
from scheduler.policy import FairSharePolicy, FcfsPolicy, PriorityPolicy
from scheduler.request import Request, RequestStatus

EOS = 0


SHARED_PREFIXES = [[10 + (7 * i) % 40 for i in range(64)], [60 + (3 * i) % 30 for i in range(64)]]


def make_request(index: int, prompt_len: int, max_new: int, priority: int = 0, shared: int = 0,
                 tenant: str = "") -> Request:
    """shared > 0: the prompt starts with one of two common prefixes (what prefix caching serves)."""
    prefix = SHARED_PREFIXES[shared % 2][: min(prompt_len - 1, 8 * shared)] if shared else []
    unique = [5 + (index * 13 + i) % 97 for i in range(prompt_len - len(prefix))]
    return Request(
        request_id=f"r{index}", prompt_token_ids=prefix + unique,
        max_new_tokens=max_new, sampling=sampling.resolved(seed=index),
        stop_token_ids=frozenset({EOS}), arrival_order=index, priority=priority, tenant=tenant,
    )


class SimulatedKv:
    """The worker as the planner sees it: it samples each step it runs, feeds PREVIOUS_TOKEN from the
    step before, and checks that every block table reads back the request's tokens."""

    def __init__(self, block_size: int, rng: random.Random, eos_rate: float = 0.02) -> None:
        self.block_size = block_size
        self.rng, self.eos_rate = rng, eos_rate
        self.slots: dict[tuple[int, int], int] = {}
        self.previous: dict[int, int] = {}  # slot -> the token it sampled in the step run last

    def run(self, step) -> dict[int, int]:
        bs = self.block_size
        for chunk in step.sequences():
            request, table = chunk.request, chunk.request.block_ids
            # Tokens of steps still in flight are not known to the planner yet (PREVIOUS_TOKEN): skip those.
            expected = request.token_ids(0, chunk.num_computed_tokens)
            cached = [self.slots.get((table[p // bs], p % bs)) for p in range(chunk.num_computed_tokens)]
            cached = [c if e != PREVIOUS_TOKEN else e for c, e in zip(cached, expected)]
            assert cached == expected, f"{request.request_id}: the cache does not hold its prefix"
            for offset, token in enumerate(chunk.token_ids):
                if token == PREVIOUS_TOKEN:
                    assert len(chunk.token_ids) == 1, "a planned token outside a decode"
                    token = self.previous[request.slot_id]
                position = chunk.num_computed_tokens + offset
                self.slots[(table[position // bs], position % bs)] = token
        self.previous = {c.request.slot_id: (EOS if self.rng.random() < self.eos_rate else 7)
                         for c in step.sequences() if c.sample}
        return self.previous


class Driver:
    """The engine loop's order of calls: with overlap (depth > 1), step N+depth-1 is planned before step N's
    result is applied."""

    def __init__(self, planner: BatchPlanner, kv: SimulatedKv, depth: int) -> None:
        self.planner, self.kv = planner, kv
        self.depth = depth
        self.in_flight: deque[tuple[PlannedStep, dict[int, int]]] = deque()
        self.delivered: dict[str, list[int]] = {}

    def advance(self) -> None:
        planner = self.planner
        sent = False
        # After a pass that was short of blocks, plan again only with nothing in flight (it may preempt).
        if planner.has_work() and not (self.in_flight and self.in_flight[-1][0].short_of_blocks):
            step = planner.schedule(in_flight=bool(self.in_flight))
            if step.requests:
                self._check(step)
                self.in_flight.append((step, self.kv.run(step)))
                sent = True
        if self.in_flight and (len(self.in_flight) > self.depth - 1 or not sent):
            step, sampled = self.in_flight.popleft()
            outputs = apply(planner, step, sampled)
            for request, token in zip(outputs.requests, outputs.token_ids):
                self.delivered.setdefault(request.request_id, []).append(token)

    def idle(self) -> bool:
        return not self.in_flight and not self.planner.has_work()

    def _check(self, step: PlannedStep) -> None:
        limits = self.planner.limits
        assert step.total_tokens <= limits.max_num_batched_tokens
        slots = [c.request.slot_id for c in step.sequences()]
        assert slots == step.slot_ids.tolist() and len(set(slots)) == len(slots)
        for chunk in step.sequences():
            assert len(chunk.request.block_ids) * limits.block_size >= chunk.num_computed_tokens + len(chunk.token_ids)


def apply(planner: BatchPlanner, step: PlannedStep, sampled: dict[int, int]) -> StepOutputs:
    """A step's result (slot -> token) applied, as the engine loop hands it over: in columns."""
    return planner.update(step, list(sampled), list(sampled.values()))


def run_step(planner: BatchPlanner, rng: random.Random, eos_rate: float = 0.02):
    """One step planned and applied at once (no overlap)."""
    step = planner.schedule()
    sampled = {c.request.slot_id: (EOS if rng.random() < eos_rate else 7) for c in step.sequences() if c.sample}
    return step, apply(planner, step, sampled)


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
        st.tuples(st.just("arrive"), st.integers(1, 60), st.integers(1, 40), st.integers(0, 3), st.integers(0, 6),
                  st.sampled_from(["", "a", "b"])),
        st.tuples(st.just("step"), st.integers(1, 4)),
        st.tuples(st.just("abort"), st.integers(0, 30)),
    ),
    max_size=60,
)


def replay(events: list[tuple], planner: BatchPlanner, driver: Driver) -> list[Request]:  # type: ignore[type-arg]
    """Play arrivals, steps and aborts, then step until idle (at most 10,000 steps), checking the planner's
    invariants after every event and step; returns the requests that arrived."""
    arrived: list[Request] = []
    for event in events:
        if event[0] == "arrive":
            _, prompt_len, max_new, priority, shared, tenant = event
            if planner.blocks_needed_alone(prompt_len, max_new) <= planner.allocator.num_usable:  # else refused
                arrived.append(make_request(len(arrived), prompt_len, max_new, priority, shared, tenant))
                planner.add(arrived[-1])
        elif event[0] == "step":
            for _ in range(event[1]):
                driver.advance()
        elif arrived:
            planner.abort(arrived[event[1] % len(arrived)].key)
        planner.check_invariants()
    for _ in range(10_000):
        if driver.idle():
            break
        driver.advance()
        planner.check_invariants()
    return arrived


@settings(max_examples=200, deadline=None)
@given(limits=limits_strategy, events=events_strategy, policy=st.sampled_from(["fcfs", "priority", "fair"]),
       prefix_caching=st.booleans(), depth=st.sampled_from([1, 2, 3]), seed=st.integers(0, 2**16))
def test_invariants_hold_after_every_event_and_nothing_leaks(limits, events, policy, prefix_caching, depth, seed):
    """With overlap (depth 2 or 3), aborts land while steps are in flight and results arrive steps late."""
    policies = {"fcfs": FcfsPolicy, "priority": PriorityPolicy, "fair": lambda: FairSharePolicy({"a": 3.0})}
    planner = BatchPlanner(limits, policies[policy](), enable_prefix_caching=prefix_caching)
    driver = Driver(planner, SimulatedKv(limits.block_size, random.Random(seed)), depth)
    arrived = replay(events, planner, driver)
    assert driver.idle()  # everything that arrived finished: no livelock, whatever the cache size
    assert all(r.status is RequestStatus.FINISHED for r in arrived)
    assert planner.allocator.num_free == planner.allocator.num_usable
    for request in arrived:
        # Clients got exactly the request's tokens: none planned past its end, none twice.
        assert driver.delivered.get(request.request_id, []) == request.output_token_ids
        assert PREVIOUS_TOKEN not in request.output_token_ids
        if request.finish_reason == common_pb2.FINISH_REASON_LENGTH:
            assert len(request.output_token_ids) == request.max_new_tokens
        if request.finish_reason == common_pb2.FINISH_REASON_STOP:
            assert request.output_token_ids[-1] == EOS and EOS not in request.output_token_ids[:-1]


def test_running_decodes_go_first_and_a_long_prompt_is_chunked_to_the_budget():
    limits = PlannerLimits(max_num_batched_tokens=32, max_num_seqs=4, max_model_len=512, block_size=16, num_kv_blocks=64)
    planner = BatchPlanner(limits, FcfsPolicy())
    short = make_request(0, 10, 50)
    planner.add(short)
    run_step(planner, random.Random(0), eos_rate=0)
    long = make_request(1, 100, 5)
    planner.add(long)
    step = planner.schedule()
    # The budget serves the decode first; the prompt gets what is left. (Column order is not policy order.)
    assert sorted((c.request.request_id, len(c.token_ids), c.sample) for c in step.sequences()) == [
        ("r0", 1, True), ("r1", 31, False)]


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
        resumed = next((c for c in step.sequences() if c.request is second), None)
        if resumed is not None:
            break
        apply(planner, step, {c.request.slot_id: 7 for c in step.sequences() if c.sample})
    assert second in step.admitted
    assert resumed.num_computed_tokens == 0  # recomputed from scratch ...
    assert resumed.token_ids == (second.prompt_token_ids + generated_before)[: len(resumed.token_ids)]  # ... same tokens


def test_abort_while_step_in_flight_frees_blocks_and_drops_the_result():
    limits = PlannerLimits(max_num_batched_tokens=64, max_num_seqs=4, max_model_len=512, block_size=16, num_kv_blocks=16)
    planner = BatchPlanner(limits, FcfsPolicy())
    request = make_request(0, 20, 10)
    planner.add(request)
    step = planner.schedule()
    planner.abort(request.key)
    assert planner.allocator.num_free == planner.allocator.num_usable
    outputs = apply(planner, step, {0: 7})
    assert outputs.requests == [] and request.output_token_ids == []
    assert request.finish_reason == common_pb2.FINISH_REASON_ABORT
    assert planner.schedule().requests == []  # nothing to send: the release waits for the next step sent
    planner.add(make_request(1, 20, 10))
    next_step = planner.schedule()
    assert next_step.released_slot_ids == [0] and len(next_step.requests) == 1
    planner.check_invariants()


def test_a_shared_prefix_is_served_from_the_cache_but_never_the_last_token():
    limits = PlannerLimits(max_num_batched_tokens=256, max_num_seqs=4, max_model_len=512, block_size=4, num_kv_blocks=64)
    planner = BatchPlanner(limits, FcfsPolicy())
    kv = SimulatedKv(4, random.Random(0), eos_rate=0)
    driver = Driver(planner, kv, depth=1)
    first = make_request(0, 40, 3, shared=5)  # 40-token prompt: 39 shared tokens, then one of its own
    planner.add(first)
    while not driver.idle():
        driver.advance()
    assert planner.allocator.num_cached == 10  # 42 computed tokens: 10 full blocks indexed
    second = make_request(1, 40, 3, shared=5)
    planner.add(second)
    step = planner.schedule()
    kv.run(step)
    assert second.num_cached_prompt_tokens == 36  # 9 full blocks of the shared 39 tokens
    assert step.sequences()[0].num_computed_tokens == 36 and len(step.sequences()[0].token_ids) == 4
    assert planner.stats.prefix_cache_hit_tokens_total == 36
    same = make_request(2, 40, 3, shared=5)
    same.prompt_token_ids = list(first.prompt_token_ids)  # identical prompt: all but the last token hit
    planner.add(same)
    step = planner.schedule()
    kv.run(step)
    assert same.num_cached_prompt_tokens == 36 and [len(c.token_ids) for c in step.sequences() if c.request is same] == [4]
    planner.check_invariants()


def test_tenants_never_share_cached_blocks():
    limits = PlannerLimits(max_num_batched_tokens=256, max_num_seqs=4, max_model_len=512, block_size=4, num_kv_blocks=64)
    planner = BatchPlanner(limits, FcfsPolicy())
    rng = random.Random(0)
    planner.add(make_request(0, 40, 2, shared=5, tenant="a"))
    while planner.has_work():
        run_step(planner, rng, eos_rate=0)
    other = make_request(1, 40, 2, shared=5, tenant="b")
    planner.add(other)
    planner.schedule()
    assert other.num_cached_prompt_tokens == 0


def test_fair_sharing_serves_a_light_tenant_before_a_flooding_one_finishes():
    limits = PlannerLimits(max_num_batched_tokens=64, max_num_seqs=2, max_model_len=512, block_size=16, num_kv_blocks=64)
    order = {}
    for name, policy in (("fcfs", FcfsPolicy()), ("fair", FairSharePolicy())):
        planner = BatchPlanner(limits, policy)
        requests = [make_request(i, 20, 10, tenant="flood") for i in range(20)]
        requests += [make_request(20 + i, 20, 10, tenant="light") for i in range(3)]
        for request in requests:
            planner.add(request)
        admitted = []
        while planner.has_work():
            step = planner.schedule()
            admitted += [r.tenant for r in step.admitted]
            apply(planner, step, {c.request.slot_id: 7 for c in step.sequences() if c.sample})
        order[name] = admitted
    assert order["fcfs"][-3:] == ["light"] * 3  # FCFS: the light tenant waits behind the whole flood
    assert max(i for i, t in enumerate(order["fair"]) if t == "light") <= 6  # fair: served within the first few


class PositionalTokens:
    """A worker whose token depends only on the request and the position (EOS now and then), so planners that
    lay a step out differently must still produce the same tokens."""

    def run(self, step: PlannedStep) -> dict[int, int]:
        return {c.request.slot_id: positional_token(c.request.request_id, c.num_computed_tokens + len(c.token_ids))
                for c in step.sequences() if c.sample}


def positional_token(request_id: str, position: int) -> int:
    return EOS if zlib.crc32(f"{request_id}@{position}".encode()) % 19 == 0 else 5 + position % 50


def step_record(step: PlannedStep) -> tuple:  # type: ignore[type-arg]
    """What a step plans, whatever its column order and block numbers."""
    sequences = sorted((c.request.request_id, c.num_computed_tokens, tuple(c.token_ids), len(c.new_block_ids), c.sample)
                       for c in step.sequences())
    return (sorted(r.request_id for r in step.admitted), len(step.released_slot_ids), sequences, step.short_of_blocks)


@settings(max_examples=150, deadline=None)
@given(limits=limits_strategy, events=events_strategy, prefix_caching=st.booleans(), depth=st.sampled_from([1, 2]))
def test_planning_in_bulk_plans_what_planning_one_request_at_a_time_plans(limits, events, prefix_caching, depth):
    """The bulk pass (over SlotColumns) against the one-by-one pass it stands in for when everything fits."""
    outcomes = []
    for bulk in (True, False):
        planner = BatchPlanner(limits, PriorityPolicy(), enable_prefix_caching=prefix_caching)
        if not bulk:
            planner._plan_running_in_bulk = lambda plan, budget: None  # type: ignore[method-assign]
        driver = Driver(planner, PositionalTokens(), depth)  # type: ignore[arg-type]
        steps: list[tuple] = []  # type: ignore[type-arg]
        original_schedule = planner.schedule

        def schedule(in_flight: bool = False, original=original_schedule, steps=steps) -> PlannedStep:
            step = original(in_flight)
            steps.append(step_record(step))
            return step

        planner.schedule = schedule  # type: ignore[method-assign]
        replay(events, planner, driver)
        outcomes.append((steps, driver.delivered, planner.stats.preemptions_total))
    assert outcomes[0] == outcomes[1]
