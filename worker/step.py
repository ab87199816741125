"""The step contract inside the worker group, independent of protobuf.

Rank 0 decodes the scheduler's StepPlan into a Step, checks it, and hands it to every
rank's engine; the engine answers with a StepOutput.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np


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


def _no_ints() -> np.ndarray:
    return np.zeros(0, dtype=np.int64)


def _no_flags() -> np.ndarray:
    return np.zeros(0, dtype=bool)


@dataclass(frozen=True, eq=False)
class Step:
    """One step's plan. The sequences it runs are columns: entry i of every per-sequence array belongs to
    sequence i, and sequence i's tokens and new blocks are runs of token_ids and new_block_ids, in
    sequence order (as in the step contract's ScheduledSequences). A decode costs a few numbers, no object.
    The arrays are int64 (sample: bool) and may be views of a received buffer: never written to."""

    step_id: int
    released_slot_ids: list[int] = field(default_factory=list)
    admissions: list[Admission] = field(default_factory=list)
    slot_ids: np.ndarray = field(default_factory=_no_ints)             # [S]
    num_computed_tokens: np.ndarray = field(default_factory=_no_ints)  # [S] tokens already in the KV cache
    num_tokens: np.ndarray = field(default_factory=_no_ints)           # [S] tokens each sequence runs
    token_ids: np.ndarray = field(default_factory=_no_ints)            # [sum num_tokens]; PREVIOUS_TOKEN allowed
    num_new_blocks: np.ndarray = field(default_factory=_no_ints)       # [S] blocks appended before the step
    new_block_ids: np.ndarray = field(default_factory=_no_ints)        # [sum num_new_blocks]
    sample: np.ndarray = field(default_factory=_no_flags)              # [S] bool

    @property
    def num_sequences(self) -> int:
        return len(self.slot_ids)

    @property
    def total_tokens(self) -> int:
        return len(self.token_ids)

    @cached_property
    def token_starts(self) -> np.ndarray:
        """[S + 1] where each sequence's run of token_ids starts; the last entry is the total."""
        return _starts(self.num_tokens)

    @cached_property
    def block_starts(self) -> np.ndarray:
        """[S + 1] where each sequence's run of new_block_ids starts; the last entry is the total."""
        return _starts(self.num_new_blocks)

    @property
    def all_single_token(self) -> bool:
        """Every sequence runs one token (decodes, and prompts whose last token alone is left after a cache hit)."""
        return bool((self.num_tokens == 1).all())

    def tokens_of(self, row: int) -> np.ndarray:
        """The run of token_ids of sequence `row`."""
        return self.token_ids[self.token_starts[row] : self.token_starts[row + 1]]


def _starts(lengths: np.ndarray) -> np.ndarray:
    starts = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    return starts


@dataclass(slots=True)
class SequenceFailure:
    """One sequence could not be sampled this step; it alone fails, the step's other tokens stand."""

    slot_id: int
    invalid_argument: bool  # its own parameters are at fault (the client's to fix); else an internal fault
    message: str


@dataclass(frozen=True)
class StepOutput:
    """A step's sampled tokens, as columns: entry i of each list belongs to sampled sequence i. A sequence that
    failed has no entry (it is in failures); top_* hold one list per sequence, empty when it asked for none."""

    step_id: int
    slot_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_token_ids: list[list[int]] = field(default_factory=list)
    top_logprobs: list[list[float]] = field(default_factory=list)
    forward_seconds: float = 0.0
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
