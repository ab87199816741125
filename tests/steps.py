"""Worker Steps for tests, written one sequence per row and read back the same way."""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import numpy as np

from worker.step import Admission, Step


class Row(NamedTuple):
    """One sequence of a step: the entries of the step's columns that belong to it."""

    slot_id: int
    token_ids: list[int]
    num_computed_tokens: int
    new_block_ids: list[int]
    sample: bool


def make_step(step_id: int, rows: Iterable[tuple[int, list[int], int, list[int], bool]] = (),
              released: Iterable[int] = (), admissions: Iterable[Admission] = ()) -> Step:
    """A step of these sequences, each a (slot, tokens, num_computed_tokens, new_block_ids, sample) row."""
    sequences = [Row(*row) for row in rows]

    def ints(values: list[int]) -> np.ndarray:
        return np.array(values, dtype=np.int64)

    return Step(step_id, list(released), list(admissions),
                slot_ids=ints([r.slot_id for r in sequences]),
                num_computed_tokens=ints([r.num_computed_tokens for r in sequences]),
                num_tokens=ints([len(r.token_ids) for r in sequences]),
                token_ids=ints([t for r in sequences for t in r.token_ids]),
                num_new_blocks=ints([len(r.new_block_ids) for r in sequences]),
                new_block_ids=ints([b for r in sequences for b in r.new_block_ids]),
                sample=np.array([r.sample for r in sequences], dtype=bool))


def rows_of(step: Step) -> list[Row]:
    """The step's sequences, one row each, in step order."""
    tokens, blocks = step.token_starts.tolist(), step.block_starts.tolist()
    return [Row(int(step.slot_ids[i]), step.token_ids[tokens[i] : tokens[i + 1]].tolist(),
                int(step.num_computed_tokens[i]), step.new_block_ids[blocks[i] : blocks[i + 1]].tolist(),
                bool(step.sample[i]))
            for i in range(step.num_sequences)]


def same_step(a: Step, b: Step) -> bool:
    return ((a.step_id, a.released_slot_ids, a.admissions, rows_of(a))
            == (b.step_id, b.released_slot_ids, b.admissions, rows_of(b)))
