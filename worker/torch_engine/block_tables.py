"""Every slot's block table, one row per slot: on the host for laying steps out, and on the device for the
paged attention kernels.

A step's new blocks are written to both at once, as arrays (no work per sequence in Python); a step's
cache slots are then one gather from the host rows.
"""

from __future__ import annotations

import numpy as np
import torch

from worker.step import Step
from worker.torch_engine.transfer import to_device

_NONE = np.zeros(0, dtype=np.int64)


class HostBlockTables:
    """tables[slot, :lengths[slot]] is the slot's block table; entries past its length are stale."""

    def __init__(self, num_slots: int, max_blocks: int) -> None:
        self.tables = np.zeros((num_slots, max_blocks), dtype=np.int64)
        self.lengths = np.zeros(num_slots, dtype=np.int64)

    def clear(self, slot: int) -> None:
        self.lengths[slot] = 0

    def append(self, step: Step) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Append each sequence's new blocks to its slot's table; the (slot, column, block id) of each entry
        written, for the device's copy. A slot runs at most once per step (validated)."""
        counts = step.num_new_blocks
        if not len(step.new_block_ids):
            return _NONE, _NONE, _NONE
        rows = np.repeat(step.slot_ids, counts)
        within = np.arange(len(rows)) - np.repeat(step.block_starts[:-1], counts)  # index inside each run
        columns = np.repeat(self.lengths[step.slot_ids], counts) + within
        self.tables[rows, columns] = step.new_block_ids
        self.lengths[step.slot_ids] += counts
        return rows, columns, step.new_block_ids


class DeviceBlockTables:
    """Every slot's block table on the device, one row per slot, grown as blocks are appended."""

    def __init__(self, num_slots: int, max_blocks: int, device: torch.device) -> None:
        self.tables = torch.zeros(num_slots, max_blocks, dtype=torch.int32, device=device)

    def write(self, rows: np.ndarray, columns: np.ndarray, block_ids: np.ndarray) -> None:
        """tables[rows[i], columns[i]] = block_ids[i], in one host-to-device copy."""
        if not len(rows):
            return
        staged = to_device(np.stack((rows, columns, block_ids)), self.tables.device)
        self.tables.index_put_((staged[0], staged[1]), staged[2].to(torch.int32))
