"""Paged KV blocks: who holds which block, with a check that nothing leaks.

Block 0 is the worker's null block (padding reads it) and is never handed out.
"""

from __future__ import annotations

from collections import deque


class OutOfBlocks(RuntimeError):
    pass


class BlockAllocator:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 2:
            raise ValueError("the KV cache needs at least 2 blocks (one is reserved)")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(1, num_blocks))
        self._ref_counts = [0] * num_blocks

    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return 0

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise OutOfBlocks(f"{count} blocks asked, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(count)]
        for block in blocks:
            self._ref_counts[block] = 1
        return blocks

    def free(self, blocks: list[int]) -> None:
        for block in blocks:
            if self._ref_counts[block] <= 0:
                raise AssertionError(f"block {block} freed twice")
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                self._free.append(block)

    def check_invariants(self, held: list[list[int]]) -> None:
        """free + used = usable; every held block counted once per holder; no block both free and held."""
        counts = [0] * self.num_blocks
        for blocks in held:
            for block in blocks:
                counts[block] += 1
        free = set(self._free)
        assert len(free) == len(self._free), "a block is on the free list twice"
        assert 0 not in free and counts[0] == 0, "the null block was handed out"
        assert counts == self._ref_counts, "reference counts disagree with the holders"
        used = sum(1 for c in counts if c > 0)
        assert not free & {b for b, c in enumerate(counts) if c > 0}, "a held block is on the free list"
        assert len(free) + used == self.num_usable, f"{len(free)} free + {used} used != {self.num_usable}"
