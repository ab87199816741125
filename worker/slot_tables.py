"""The worker group's own record of admitted slots and their block tables, as accepted steps left them.

Plans are validated against it (worker/validation.py), and a lost scheduler stream releases every
slot it lists, on every rank, without asking an engine what it holds.
"""

from __future__ import annotations

import numpy as np

from worker.step import Step

NOT_ADMITTED = -1


class SlotTables:
    def __init__(self, num_slots: int) -> None:
        self.tables: dict[int, list[int]] = {}
        # Per slot, as arrays for checks over a whole step: blocks in its table (NOT_ADMITTED: free), and
        # whether the last step sampled it (a next step may then feed its token from the device).
        self.num_blocks = np.full(num_slots, NOT_ADMITTED, dtype=np.int64)
        self.sampled = np.zeros(num_slots, dtype=bool)

    @property
    def num_slots(self) -> int:
        return len(self.num_blocks)

    def apply(self, step: Step) -> None:
        """Record a step that passed validation: releases, then admissions, then each sequence's new blocks."""
        for slot in step.released_slot_ids:
            if self.tables.pop(slot, None) is not None:
                self.num_blocks[slot] = NOT_ADMITTED
        for admission in step.admissions:
            self.tables[admission.slot_id] = []
            self.num_blocks[admission.slot_id] = 0
        starts, block_ids, slots = step.block_starts, step.new_block_ids, step.slot_ids
        for row in np.flatnonzero(step.num_new_blocks).tolist():
            self.tables[int(slots[row])].extend(block_ids[starts[row] : starts[row + 1]].tolist())
        self.num_blocks[slots] += step.num_new_blocks  # a slot runs at most once per step
        self.sampled[:] = False
        self.sampled[slots[step.sample]] = True

    def slots(self) -> list[int]:
        return list(self.tables)

    def clear(self) -> None:
        self.tables.clear()
        self.num_blocks[:] = NOT_ADMITTED
        self.sampled[:] = False
