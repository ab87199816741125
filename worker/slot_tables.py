"""The worker group's own record of admitted slots and their block tables, as accepted steps left them.

Plans are validated against it (worker/validation.py), and a lost scheduler stream releases every
slot it lists, on every rank, without asking an engine what it holds.
"""

from __future__ import annotations

from worker.step import Step


class SlotTables:
    def __init__(self) -> None:
        self.tables: dict[int, list[int]] = {}
        self.sampled: set[int] = set()  # slots the last step sampled: a next step may feed their tokens

    def apply(self, step: Step) -> None:
        """Record a step that passed validation: releases, then admissions, then each chunk's new blocks."""
        for slot in step.released_slot_ids:
            self.tables.pop(slot, None)
        for admission in step.admissions:
            self.tables[admission.slot_id] = []
        for chunk in step.chunks:
            self.tables[chunk.slot_id].extend(chunk.new_block_ids)
        self.sampled = {chunk.slot_id for chunk in step.chunks if chunk.sample}

    def slots(self) -> list[int]:
        return list(self.tables)

    def clear(self) -> None:
        self.tables.clear()
        self.sampled = set()
