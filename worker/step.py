"""The step contract inside the worker group, independent of protobuf.

Rank 0 decodes the scheduler's StepPlan into a Step, checks it, and hands it to every
rank's engine; the engine answers with a StepOutput.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(slots=True)
class Admission:
    """A sequence's fixed data, sent once when it first gets a slot. (Not frozen: built per step, and
    frozen dataclasses cost several times more to construct.)"""

    request_id: str
    slot_id: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0
    top_logprobs: int = 0
    num_prompt_tokens: int = 0
    stop_token_ids: list[int] = field(default_factory=list)
    context_token_ids: list[int] = field(default_factory=list)  # sent only when a penalty needs them

    @property
    def needs_history(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass(slots=True)
class ScheduledChunk:
    slot_id: int
    token_ids: list[int]
    num_computed_tokens: int
    new_block_ids: list[int]
    sample: bool


@dataclass(frozen=True)
class Step:
    step_id: int
    released_slot_ids: list[int] = field(default_factory=list)
    admissions: list[Admission] = field(default_factory=list)
    chunks: list[ScheduledChunk] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(chunk.token_ids) for chunk in self.chunks)


@dataclass(slots=True)
class SampledToken:
    slot_id: int
    token_id: int
    logprob: float
    top_token_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)


@dataclass(slots=True)
class SequenceFailure:
    """One sequence could not be sampled this step; it alone fails, the step's other tokens stand."""

    slot_id: int
    invalid_argument: bool  # its own parameters are at fault (the client's to fix); else an internal fault
    message: str


@dataclass(frozen=True)
class StepOutput:
    step_id: int
    sampled: list[SampledToken]
    forward_seconds: float
    failures: list[SequenceFailure] = field(default_factory=list)


class PendingStep:
    """A step an engine has launched. wait() blocks until its outputs can be read without waiting on the
    device (any thread; it may return at once); result() reads them (the engine's thread, once, in
    launch order). Between the two, the engine may launch the next step."""

    def __init__(self, result: Callable[[], StepOutput], wait: Callable[[], None] | None = None) -> None:
        self._result = result
        self._wait = wait

    @staticmethod
    def done(output: StepOutput) -> PendingStep:
        return PendingStep(lambda: output)

    def wait(self) -> None:
        if self._wait is not None:
            self._wait()

    def result(self) -> StepOutput:
        return self._result()


@dataclass(frozen=True)
class EngineDescription:
    model_name: str
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    tp_size: int
    block_size: int
    num_kv_blocks: int
    max_num_batched_tokens: int
    max_num_seqs: int
    max_model_len: int
    device: str
    dtype: str
    engine: str
    prefix_caching: bool = False  # it reads K/V of shared blocks another sequence computed (cache hits)


class StepRejected(ValueError):
    """A step plan that breaks the contract; nothing of it was applied."""
