"""The engine conformance suite: what every engine behind worker/engine.py must do, as it stands.

Parametrised by engine name (worker.engine.ENGINES) and model family: the embedded SmolLM2 (Llama),
and tiny MPT (ALiBi) and Mixtral (mixture of experts) checkpoints written by transformers. Each
engine runs in this process behind the real WorkerGroup and plan validation, in float32, driven
step by step the way the scheduler drives it: the handshake, admission and release, chunked
prefill, recompute after preemption, prefix-cache hits, malformed plans, and greedy tokens
against transformers.
A new backend (TensorRT-LLM's included) is added to ENGINES and must pass this file unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from mpi4py import MPI

from services.text.codec import TextCodec
from tests.tiny_models import load_reference, reference_greedy, save_tiny
from worker.config import WorkerConfig
from worker.engine import ENGINES, create_engine
from worker.group import WorkerGroup
from inflight.step_contract import PREVIOUS_TOKEN
from tests.steps import make_step, rows_of
from worker.step import Admission, EngineDescription, PendingStep, Step, StepRejected
from worker.validation import check_step

BLOCK_SIZE = 16
NUM_KV_BLOCKS = 256
MAX_NUM_SEQS = 8
MAX_NUM_BATCHED_TOKENS = 256
MAX_MODEL_LEN = 512
PROMPTS = ["The history of the printing press begins", "Once upon a time, in a village by the sea,",
           "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"]
# Several blocks long, so chunks and cached blocks fall both on and off block boundaries.
LONG_PROMPT = ("Explain, step by step and in detail, how a bicycle gear system lets a rider climb a steep hill without "
               "pedalling harder, and why professional cyclists change gear so often during a long mountain race.")


class Driver:
    """Plays the scheduler: slots, blocks and steps, each step checked the way rank 0 checks a plan."""

    def __init__(self, group: WorkerGroup) -> None:
        self.group = group
        self.description = group.describe()
        self.free_blocks = list(range(1, self.description.num_kv_blocks))
        self.step_id = 0
        self.tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}

    def plan(self, released: list[int] | None = None, admitted: list[int] | list[Admission] | None = None,
             inputs: dict[int, list[int]] | None = None, shared: dict[int, list[int]] | None = None,
             sample: bool = True) -> Step:
        """A step; admitted: slots (greedy) or admissions; shared[slot]: blocks another slot computed, put first
        in this slot's table (cache hits)."""
        self.step_id += 1
        chunks = []
        for slot, tokens in (inputs or {}).items():
            start = self.lengths.get(slot, 0)
            new = list((shared or {}).get(slot, []))
            have = len(self.tables.get(slot, [])) + len(new)
            need = -(-(start + len(tokens)) // BLOCK_SIZE) - have
            new += [self.free_blocks.pop(0) for _ in range(max(0, need))]
            chunks.append((slot, tokens, start, new, sample))
        admissions = [a if isinstance(a, Admission) else Admission(f"r{self.step_id}-{a}", a, 0.0, 1.0, 0, 0)
                      for a in admitted or []]
        return make_step(self.step_id, chunks, released or [], admissions)

    def run(self, step: Step) -> dict[int, int]:
        return self.tokens(self.launch(step))

    @staticmethod
    def tokens(pending: PendingStep) -> dict[int, int]:
        output = pending.result()
        assert not output.failures, output.failures
        return dict(zip(output.slot_ids, output.token_ids))

    def launch(self, step: Step) -> PendingStep:
        check_step(step, self.description, self.group.slot_tables)
        for slot in step.released_slot_ids:
            self.tables.pop(slot, None)
            self.lengths.pop(slot, None)
        for admission in step.admissions:
            self.tables[admission.slot_id], self.lengths[admission.slot_id] = [], 0
        for row in rows_of(step):
            self.tables[row.slot_id] += row.new_block_ids
            self.lengths[row.slot_id] = row.num_computed_tokens + len(row.token_ids)
        return self.group.launch(step)

    def generate(self, slot: int, prompt: list[int], new_tokens: int, chunk: int = 0) -> list[int]:
        """Greedy tokens of one sequence in `slot`; its prompt in chunks of `chunk` tokens (0: one piece)."""
        pieces = [prompt[i:i + chunk] for i in range(0, len(prompt), chunk)] if chunk else [prompt]
        sampled: dict[int, int] = {}
        for index, piece in enumerate(pieces):
            last = index == len(pieces) - 1
            sampled = self.run(self.plan(admitted=[slot] if index == 0 else None, inputs={slot: piece}, sample=last))
        out = [sampled[slot]]
        while len(out) < new_tokens:
            out.append(self.run(self.plan(inputs={slot: [out[-1]]}))[slot])
        return out

    def release(self, *slots: int) -> None:
        self.run(self.plan(released=list(slots)))


FAMILIES = ["llama", "mpt", "mixtral"]


@pytest.fixture(scope="module", params=FAMILIES)
def model_folder(request: pytest.FixtureRequest, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if request.param == "llama":
        return model_dir
    return save_tiny(request.param, tmp_path_factory.mktemp(f"tiny-{request.param}"), model_dir)


@pytest.fixture(scope="module", params=sorted(ENGINES))
def group(request: pytest.FixtureRequest, model_folder: Path) -> Iterator[WorkerGroup]:
    config = WorkerConfig(model=str(model_folder), listen="", device="cpu", dtype="float32", block_size=BLOCK_SIZE,
                          num_kv_blocks=NUM_KV_BLOCKS, kv_cache_gb=0, max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
                          max_num_seqs=MAX_NUM_SEQS, max_model_len=MAX_MODEL_LEN, seed=0, log_level="warning",
                          engine=request.param)
    threads = torch.get_num_threads()
    engine_group = WorkerGroup(MPI.COMM_WORLD, create_engine(config, MPI.COMM_WORLD))
    engine_group.warmup()
    yield engine_group
    engine_group.shutdown()
    torch.set_num_threads(threads)


@pytest.fixture
def driver(group: WorkerGroup) -> Iterator[Driver]:
    driver = Driver(group)
    yield driver
    group.release_all()  # every test starts from no admitted slot
    assert group.block_tables() == {}


@pytest.fixture(scope="module")
def tokenize(model_folder: Path):  # noqa: ANN201
    codec = TextCodec(model_folder)
    return lambda text: codec.tokenizer.encode(text).ids


@pytest.fixture(scope="module")
def reference(request: pytest.FixtureRequest, model_folder: Path, model_dir: Path) -> torch.nn.Module:
    """transformers' model of the same weights: the GGUF it imports for SmolLM2, else the saved folder."""
    if model_folder == model_dir:
        return request.getfixturevalue("hf_reference")[1]
    return load_reference(model_folder)


def test_handshake_describes_the_model_and_the_limits_it_was_given(group: WorkerGroup, tokenize) -> None:
    description = group.describe()
    assert isinstance(description, EngineDescription)
    assert description.engine in ENGINES
    assert description.vocab_size == 49152 and description.eos_token_ids
    assert (description.block_size, description.max_num_seqs) == (BLOCK_SIZE, MAX_NUM_SEQS)
    assert description.max_num_batched_tokens == MAX_NUM_BATCHED_TOKENS
    assert description.max_model_len == MAX_MODEL_LEN
    assert description.num_kv_blocks == NUM_KV_BLOCKS and description.tp_size == 1
    assert 1 < group.warmup() <= NUM_KV_BLOCKS  # warm-up may be repeated, and leaves the cache usable


def test_greedy_tokens_equal_transformers(driver: Driver, reference: torch.nn.Module, tokenize) -> None:
    prompts = [tokenize(text) for text in PROMPTS]
    # All sequences in one batch: admitted and prefilled together, then decoded together.
    sampled = driver.run(driver.plan(admitted=list(range(len(prompts))), inputs=dict(enumerate(prompts))))
    ours = {slot: [token] for slot, token in sampled.items()}
    for _ in range(15):
        sampled = driver.run(driver.plan(inputs={slot: [tokens[-1]] for slot, tokens in ours.items()}))
        for slot, token in sampled.items():
            ours[slot].append(token)
    for slot, ids in enumerate(prompts):
        assert ours[slot] == reference_greedy(reference, ids, 16), PROMPTS[slot]


def test_admission_and_release_leave_no_trace_in_a_reused_slot(driver: Driver, tokenize) -> None:
    first, second = tokenize(PROMPTS[0]), tokenize(PROMPTS[1])
    expected = driver.generate(5, second, 6)
    driver.release(5)
    driver.generate(0, first, 6)
    driver.release(0, 7)  # releasing a slot never admitted is accepted and ignored
    assert 0 not in driver.group.block_tables()
    assert driver.generate(0, second, 6) == expected


@pytest.mark.parametrize("chunk", [16, 7])
def test_chunked_prefill_gives_the_tokens_of_one_piece(driver: Driver, tokenize, chunk: int) -> None:
    prompt = tokenize(LONG_PROMPT)
    assert len(prompt) > 2 * chunk
    whole = driver.generate(0, prompt, 8)
    assert driver.generate(1, prompt, 8, chunk=chunk) == whole


def test_recompute_after_preemption_gives_the_tokens_of_an_uninterrupted_run(driver: Driver, tokenize) -> None:
    prompt = tokenize(PROMPTS[1])
    uninterrupted = driver.generate(0, prompt, 12)
    before = driver.generate(1, prompt, 5)
    driver.release(1)  # preempted: its blocks go back; it returns in another slot and recomputes all it had
    after = driver.generate(2, prompt + before, 7)
    assert before + after == uninterrupted


def test_prefix_cache_hits_give_the_tokens_of_misses(driver: Driver, group: WorkerGroup, tokenize) -> None:
    if not group.describe().prefix_caching:
        pytest.skip("this engine does not take prefix-cache hits (prefix_caching is off in its description)")
    prompt = tokenize(LONG_PROMPT)
    full_blocks = len(prompt) // BLOCK_SIZE
    assert full_blocks >= 2
    miss = driver.generate(0, prompt, 8)
    cached = driver.tables[0][:full_blocks]
    cached_tokens = full_blocks * BLOCK_SIZE
    # The second sequence starts after the first one's full blocks: only its tail is computed.
    driver.lengths[1] = cached_tokens
    sampled = driver.run(driver.plan(admitted=[1], inputs={1: prompt[cached_tokens:]}, shared={1: cached}))
    hit = [sampled[1]]
    while len(hit) < 8:
        hit.append(driver.run(driver.plan(inputs={1: [hit[-1]]}))[1])
    assert driver.tables[1][:full_blocks] == cached
    assert hit == miss


@pytest.mark.parametrize("steps_in_flight", [2, 3])
def test_steps_launched_before_the_previous_result_is_read_give_the_same_tokens(driver: Driver, tokenize,
                                                                              steps_in_flight: int) -> None:
    """Overlap scheduling: each decode step is launched with PREVIOUS_TOKEN before the steps before it are read.
    Greedy, seeded sampling, and penalties (whose history then lacks the tokens in flight) alike."""
    prompts = [tokenize(text) for text in PROMPTS]

    def admissions(first_slot: int) -> list[Admission]:
        return [Admission("greedy", first_slot, 0.0, 1.0, 0, 0),
                Admission("seeded", first_slot + 1, 0.9, 0.95, 40, 1234),
                Admission("penalised", first_slot + 2, 0.7, 1.0, 0, 77, repetition_penalty=1.5, presence_penalty=0.5,
                          frequency_penalty=0.3, num_prompt_tokens=len(prompts[2]), context_token_ids=prompts[2])]

    def prefill(first_slot: int) -> Step:
        return driver.plan(admitted=admissions(first_slot),
                           inputs={first_slot + i: prompt for i, prompt in enumerate(prompts)})

    one_at_a_time = driver.run(prefill(0))
    expected = {slot: [token] for slot, token in one_at_a_time.items()}
    for _ in range(11):
        for slot, token in driver.run(driver.plan(inputs={s: [t[-1]] for s, t in expected.items()})).items():
            expected[slot].append(token)
    overlapped: dict[int, list[int]] = {3: [], 4: [], 5: []}
    launched = [driver.launch(prefill(3))]
    for _ in range(11):
        launched.append(driver.launch(driver.plan(inputs={slot: [PREVIOUS_TOKEN] for slot in overlapped})))
        if len(launched) == steps_in_flight:
            for slot, token in driver.tokens(launched.pop(0)).items():
                overlapped[slot].append(token)
    for pending in launched:
        for slot, token in driver.tokens(pending).items():
            overlapped[slot].append(token)
    assert [overlapped[3 + i] for i in range(3)] == [expected[i] for i in range(3)]


MALFORMED = {
    "a slot never admitted": lambda d: d.plan(inputs={3: [5]}),
    "a slot outside the slot range": lambda d: d.plan(admitted=[MAX_NUM_SEQS], inputs={MAX_NUM_SEQS: [5]}),
    "a token outside the vocabulary": lambda d: d.plan(admitted=[3], inputs={3: [5, 49152]}),
    "a block outside the cache": lambda d: make_step(99, [(3, [5, 6], 0, [NUM_KV_BLOCKS], True)],
                                                     admissions=[Admission("x", 3, 0.0, 1.0, 0, 0)]),
    "too few blocks for the tokens": lambda d: make_step(99, [(3, list(range(5, 25)), 0, [9], True)],
                                                         admissions=[Admission("x", 3, 0.0, 1.0, 0, 0)]),
    "more tokens than a step may carry": lambda d: d.plan(admitted=[3], inputs={3: [5] * (MAX_NUM_BATCHED_TOKENS + 1)}),
    "past max_model_len": lambda d: make_step(99, [(3, [5], MAX_MODEL_LEN, [9], True)],
                                              admissions=[Admission("x", 3, 0.0, 1.0, 0, 0)]),
    "an admitted slot admitted again": lambda d: d.plan(admitted=[0], inputs={0: [5]}),
    "a previous token the step before did not sample": lambda d: d.plan(admitted=[3], inputs={3: [PREVIOUS_TOKEN]}),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_a_malformed_plan_is_rejected_and_nothing_of_it_is_applied(driver: Driver, tokenize, name: str) -> None:
    prompt = tokenize(PROMPTS[0])
    expected = driver.generate(0, prompt, 6)
    driver.release(0)
    first = driver.generate(0, prompt, 3)
    tables = {slot: list(table) for slot, table in driver.group.block_tables().items()}
    free = list(driver.free_blocks)
    with pytest.raises(StepRejected):
        check_step(MALFORMED[name](driver), driver.description, driver.group.slot_tables)
    driver.free_blocks = free  # the scheduler takes back what it planned for the rejected step
    assert driver.group.block_tables() == tables
    rest = [first[-1]]
    for _ in range(3):
        rest.append(driver.run(driver.plan(inputs={0: [rest[-1]]}))[0])
    assert first + rest[1:] == expected
