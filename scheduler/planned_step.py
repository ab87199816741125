"""A planned step as columns, and what its result gave each request, as columns."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from scheduler.request import Request


def _empty() -> np.ndarray:
    return np.zeros(0, dtype=np.int64)


@dataclass
class PlannedStep:
    """A step as columns (worker.proto's ScheduledSequences): entry i of every per-sequence column belongs to
    sequence i, and its tokens and new blocks are consecutive runs of token_ids and new_block_ids."""

    step_id: int
    released_slot_ids: list[int]
    admitted: list[Request] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    slot_ids: np.ndarray = field(default_factory=_empty)
    num_computed_tokens: np.ndarray = field(default_factory=_empty)  # where each sequence's tokens start
    num_tokens: np.ndarray = field(default_factory=_empty)           # tokens each sequence runs
    token_ids: np.ndarray = field(default_factory=_empty)
    num_new_blocks: np.ndarray = field(default_factory=_empty)
    new_block_ids: np.ndarray = field(default_factory=_empty)
    sample: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))  # the step samples its next token
    leases: np.ndarray = field(default_factory=_empty)  # each slot's lease when planned (SlotColumns.lease)
    short_of_blocks: bool = False  # a running request was left out: making room for it needs a preemption

    @property
    def total_tokens(self) -> int:
        return len(self.token_ids)

    def sequences(self) -> list[PlannedSequence]:
        """The columns read back one sequence at a time (for inspection; the step path reads the columns)."""
        rows, token_at, block_at = [], 0, 0
        token_ids, block_ids = self.token_ids.tolist(), self.new_block_ids.tolist()
        for request, computed, count, blocks, sample in zip(self.requests, self.num_computed_tokens.tolist(),
                                                            self.num_tokens.tolist(), self.num_new_blocks.tolist(),
                                                            self.sample.tolist()):
            rows.append(PlannedSequence(request, token_ids[token_at : token_at + count], computed,
                                        block_ids[block_at : block_at + blocks], sample))
            token_at += count
            block_at += blocks
        return rows


@dataclass
class StepBuilder:
    """A step while it is planned: sequences planned one at a time go into lists, decodes planned in bulk come as
    arrays (they go last); build() joins them into a PlannedStep's columns."""

    admitted: list[Request] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    slot_ids: list[int] = field(default_factory=list)
    num_computed_tokens: list[int] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    num_new_blocks: list[int] = field(default_factory=list)
    new_block_ids: list[int] = field(default_factory=list)
    sample: list[bool] = field(default_factory=list)
    decodes: Decodes | None = None
    short_of_blocks: bool = False

    def add(self, request: Request, slot: int, start: int, token_ids: list[int], new_block_ids: list[int]) -> None:
        """One sequence's run (its sample flag follows, once its tokens are counted)."""
        self.requests.append(request)
        self.slot_ids.append(slot)
        self.num_computed_tokens.append(start)
        self.num_tokens.append(len(token_ids))
        self.token_ids += token_ids
        self.num_new_blocks.append(len(new_block_ids))
        self.new_block_ids += new_block_ids

    def build(self, step_id: int) -> PlannedStep:
        step = PlannedStep(step_id, [], self.admitted, self.requests, short_of_blocks=self.short_of_blocks)
        d = self.decodes
        if d is None:
            if self.requests:
                step.slot_ids, step.num_computed_tokens, step.num_tokens, step.token_ids, step.num_new_blocks, \
                    step.new_block_ids = (np.array(column, dtype=np.int64) for column in (
                        self.slot_ids, self.num_computed_tokens, self.num_tokens, self.token_ids,
                        self.num_new_blocks, self.new_block_ids))
                step.sample = np.array(self.sample, dtype=bool)
            return step
        count = len(d.requests)
        step.requests = self.requests + d.requests
        step.slot_ids = _joined(self.slot_ids, d.slot_ids)
        step.num_computed_tokens = _joined(self.num_computed_tokens, d.positions)
        step.num_tokens = _joined(self.num_tokens, np.ones(count, dtype=np.int64))
        step.token_ids = _joined(self.token_ids, d.token_ids)
        step.num_new_blocks = _joined(self.num_new_blocks, d.grows.astype(np.int64))
        step.new_block_ids = np.array(self.new_block_ids + d.new_block_ids, dtype=np.int64)
        step.sample = np.concatenate([np.array(self.sample, dtype=bool), np.ones(count, dtype=bool)])
        return step


@dataclass
class Decodes:
    """Running requests whose next token is their last one, planned in bulk."""

    requests: list[Request]
    slot_ids: np.ndarray
    positions: np.ndarray
    token_ids: np.ndarray
    grows: np.ndarray  # bool: it adds one block
    new_block_ids: list[int]


@dataclass(frozen=True)
class PlannedSequence:
    request: Request
    token_ids: list[int]
    num_computed_tokens: int
    new_block_ids: list[int]
    sample: bool


@dataclass
class StepOutputs:
    """What a step's result gave the requests it sampled, as columns: entry i of every list is one request's."""

    requests: list[Request] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    slot_ids: list[int] = field(default_factory=list)        # the slot each token was sampled in (released since if it ended)
    finish_reasons: list[int] = field(default_factory=list)  # FINISH_REASON_UNSPECIFIED while the request runs on
    first: list[bool] = field(default_factory=list)          # the request's first output token


def _joined(listed: list[int], bulk: np.ndarray) -> np.ndarray:
    """A column of sequences planned one at a time, then those planned in bulk."""
    return np.concatenate([np.array(listed, dtype=np.int64), bulk]) if listed else bulk
