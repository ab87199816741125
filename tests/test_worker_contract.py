"""The step contract, spoken to a real MPI-launched worker over gRPC."""

from __future__ import annotations

import queue
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from inflight import sampling
from inflight.v1 import worker_pb2, worker_pb2_grpc
from tests.processes import child_env
from tests.stack import REPO
from tests.steps import Row, make_step, same_step
from worker.fanout import decode_step, encode_step
from worker.step import Admission

admissions = st.builds(Admission, request_id=st.just(""), slot_id=st.integers(0, 255),
                       temperature=st.floats(0, 2), top_p=st.floats(0.01, 1), top_k=st.integers(0, 100),
                       seed=st.integers(0, 2**64 - 1), min_p=st.floats(0, 1), repetition_penalty=st.floats(0.1, 10),
                       presence_penalty=st.floats(-2, 2), frequency_penalty=st.floats(-2, 2),
                       min_tokens=st.integers(0, 100), top_logprobs=st.integers(0, 20),
                       num_prompt_tokens=st.integers(0, 8192), stop_token_ids=st.lists(st.integers(0, 2**17), max_size=4),
                       context_token_ids=st.lists(st.integers(0, 2**17), max_size=20))
rows = st.builds(Row, slot_id=st.integers(0, 255), token_ids=st.lists(st.integers(0, 2**32 - 1), min_size=1),
                 num_computed_tokens=st.integers(0, 10**5), new_block_ids=st.lists(st.integers(1, 10**5)),
                 sample=st.booleans())


@given(step=st.builds(make_step, step_id=st.integers(0, 2**62), rows=st.lists(rows, max_size=6),
                      released=st.lists(st.integers(0, 255)), admissions=st.lists(admissions, max_size=4)))
def test_broadcast_encoding_round_trips(step):
    assert same_step(decode_step(encode_step(step)), step)


@pytest.fixture(scope="module")
def worker(model_dir, tmp_path_factory):
    socket = tmp_path_factory.mktemp("worker") / "worker.sock"
    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    process = subprocess.Popen([mpiexec, "-n", "1", sys.executable, "-m", "worker", "--model", str(model_dir),
                                "--listen", f"unix://{socket}", "--num-kv-blocks", "32", "--max-num-seqs", "4",
                                "--max-num-batched-tokens", "64"], cwd=REPO, start_new_session=True,
                               env=child_env())
    channel = grpc.insecure_channel(f"unix://{socket}")
    stub = worker_pb2_grpc.WorkerStub(channel)
    description = stub.Describe(worker_pb2.DescribeRequest(), wait_for_ready=True, timeout=120)
    stub.Warmup(worker_pb2.WarmupRequest(), timeout=120)
    yield stub, description
    channel.close()
    process.terminate()
    process.wait(20)


class StepStream:
    def __init__(self, stub):
        self._plans: queue.Queue = queue.Queue()
        self._results = stub.Run(iter(self._plans.get, None))

    def send(self, plan: worker_pb2.StepPlan) -> worker_pb2.StepResult:
        self._plans.put(plan)
        return next(self._results)

    def close(self) -> None:
        self._plans.put(None)


def add_sequence(columns: worker_pb2.ScheduledSequences, slot: int, tokens: list[int], computed: int,
                 blocks: list[int], sample: bool) -> worker_pb2.ScheduledSequences:
    """Append one sequence to a plan's columns."""
    columns.slot_ids.append(slot)
    columns.num_computed_tokens.append(computed)
    columns.num_tokens.append(len(tokens))
    columns.token_ids.extend(tokens)
    columns.num_new_blocks.append(len(blocks))
    columns.new_block_ids.extend(blocks)
    columns.sample.append(sample)
    return columns


def one_sequence(slot: int, tokens: list[int], computed: int, blocks: list[int],
                 sample: bool) -> worker_pb2.ScheduledSequences:
    return add_sequence(worker_pb2.ScheduledSequences(), slot, tokens, computed, blocks, sample)


def prefill(slot: int, tokens: list[int], blocks: list[int], step_id: int) -> worker_pb2.StepPlan:
    return worker_pb2.StepPlan(
        step_id=step_id,
        new_sequences=[worker_pb2.NewSequence(request_id=f"r{slot}", slot_id=slot,
                                              sampling=sampling.resolved(seed=1))],
        sequences=one_sequence(slot, tokens, 0, blocks, True))


@pytest.mark.slow
def test_worker_describes_itself(worker):
    _, description = worker
    assert description.vocab_size == 49152 and description.num_kv_blocks == 32
    assert description.block_size == 16 and description.max_num_seqs == 4 and description.tp_size == 1
    assert list(description.eos_token_ids) == [2]


BAD_PLANS = [
    ("block id out of range", prefill(0, [1, 2, 3], [32], 1), "block id"),
    ("null block in table", prefill(0, [1, 2, 3], [0], 1), "block id"),
    ("table too short", prefill(0, list(range(1, 18)), [1], 1), "cannot hold"),
    ("slot out of range", prefill(4, [1, 2, 3], [1], 1), "slot 4"),
    ("token outside vocabulary", prefill(0, [49152], [1], 1), "vocabulary"),
    ("over the step budget", prefill(0, [1] * 65, [1, 2, 3, 4, 5], 1), "exceed"),
    ("unknown slot", worker_pb2.StepPlan(step_id=1, sequences=one_sequence(2, [1], 0, [1], True)), "not admitted"),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,plan,message", BAD_PLANS, ids=[b[0] for b in BAD_PLANS])
def test_worker_rejects_a_plan_that_breaks_the_contract_and_applies_none_of_it(worker, name, plan, message):
    stub, _ = worker
    stream = StepStream(stub)
    try:
        result = stream.send(plan)
        assert message in result.error and not result.sampled.slot_ids
        # Nothing of the rejected plan was applied: the same slot can be admitted cleanly.
        good = stream.send(prefill(0, [1, 4093, 198], [1], 2))
        assert good.error == "" and list(good.sampled.slot_ids) == [0]
    finally:
        stream.close()


@pytest.mark.slow
def test_prefill_in_chunks_gives_the_same_token_as_in_one_piece(worker):
    stub, _ = worker
    prompt = [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198, 504, 3575, 282]
    stream = StepStream(stub)
    try:
        whole = stream.send(prefill(0, prompt, [1, 2], 1)).sampled.token_ids[0]
        first = worker_pb2.StepPlan(step_id=2, released_slot_ids=[0], new_sequences=[worker_pb2.NewSequence(
            request_id="c", slot_id=1, sampling=sampling.resolved(seed=1))],
            sequences=one_sequence(1, prompt[:7], 0, [3], False))
        assert not stream.send(first).sampled.slot_ids
        second = worker_pb2.StepPlan(step_id=3, sequences=one_sequence(1, prompt[7:], 7, [4], True))
        assert list(stream.send(second).sampled.token_ids) == [whole]
    finally:
        stream.close()


@pytest.mark.slow
def test_after_a_rejected_plan_the_schedulers_release_of_its_slots_is_accepted(worker):
    stub, _ = worker
    stream = StepStream(stub)
    try:
        rejected = stream.send(prefill(3, [1, 2, 3], [32], 1))  # block 32 is out of range: nothing applied
        assert rejected.error
        # The scheduler failed that request and releases slot 3, which the worker never admitted.
        plan = prefill(3, [1, 4093, 198], [1], 2)
        plan.released_slot_ids.append(3)
        accepted = stream.send(plan)
        assert accepted.error == "" and list(accepted.sampled.slot_ids) == [3]
    finally:
        stream.close()


@pytest.mark.slow
def test_a_sequence_the_sampler_cannot_serve_fails_alone_and_the_worker_serves_on(worker):
    stub, _ = worker
    prompt = [1, 4093, 198, 1780, 314, 260]
    stream = StepStream(stub)
    try:
        alone = stream.send(prefill(0, prompt, [1], 1)).sampled.token_ids[0]
        plan = prefill(1, prompt, [2], 2)
        plan.released_slot_ids.append(0)
        plan.new_sequences.add(request_id="poison", slot_id=2, sampling=sampling.resolved(
            temperature=float("nan"), seed=1))
        add_sequence(plan.sequences, 2, prompt, 0, [3], True)
        mixed = stream.send(plan)
        assert mixed.error == "" and list(zip(mixed.sampled.slot_ids, mixed.sampled.token_ids)) == [(1, alone)]
        assert [(e.slot_id, e.code) for e in mixed.sequence_errors] == [(2, grpc.StatusCode.INVALID_ARGUMENT.value[0])]
        after = stream.send(worker_pb2.StepPlan(step_id=3, released_slot_ids=[2],
                                                sequences=one_sequence(1, [alone], len(prompt), [], True)))
        assert after.error == "" and len(after.sampled.slot_ids) == 1
    finally:
        stream.close()
