"""Paged KV blocks with a prefix cache: who holds which block, and what a free block still holds.

A full block is keyed by a chained hash of (parent block's hash, its token ids, a salt).
A block whose last holder lets go stays in the cache, on an LRU free list, until a new
allocation needs it. Block 0 is the worker's null block (padding reads it); never handed out.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable


class OutOfBlocks(RuntimeError):
    pass


class BlockAllocator:
    def __init__(self, num_blocks: int, on_evict: Callable[[int], None] | None = None) -> None:
        """on_evict(block_hash) is told of each cached block dropped from the prefix index."""
        if num_blocks < 2:
            raise ValueError("the KV cache needs at least 2 blocks (one is reserved)")
        self.num_blocks = num_blocks
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(1, num_blocks))  # oldest first
        self._ref_counts = [0] * num_blocks
        self._hash_of: list[int | None] = [None] * num_blocks
        self._block_of: dict[int, int] = {}
        self._on_evict = on_evict

    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_cached(self) -> int:
        """Free blocks that still hold a cached prefix."""
        return sum(1 for b in self._free if self._hash_of[b] is not None)

    def ref_count(self, block: int) -> int:
        return self._ref_counts[block]

    def allocate(self, count: int) -> list[int]:
        """Fresh blocks, evicting the least recently freed cached ones first."""
        if count > len(self._free):
            raise OutOfBlocks(f"{count} blocks asked, {len(self._free)} free")
        blocks = []
        for _ in range(count):
            block, _ = self._free.popitem(last=False)
            self._evict(block)
            self._ref_counts[block] = 1
            blocks.append(block)
        return blocks

    def allocate_one(self) -> int:
        """One fresh block (what a decode adds), as allocate(1) gives it."""
        if not self._free:
            raise OutOfBlocks("1 block asked, none free")
        block, _ = self._free.popitem(last=False)
        if self._hash_of[block] is not None:
            self._evict(block)
        self._ref_counts[block] = 1
        return block

    def touch(self, blocks: list[int]) -> None:
        """Take a reference on cached blocks (a prefix-cache hit)."""
        for block in blocks:
            if self._ref_counts[block] == 0:
                del self._free[block]
            self._ref_counts[block] += 1

    def free(self, blocks: list[int]) -> None:
        """Drop one reference on each block; the last block of a sequence is the first to be evicted."""
        for block in reversed(blocks):
            if self._ref_counts[block] <= 0:
                raise AssertionError(f"block {block} freed twice")
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                self._free[block] = None

    def indexed(self) -> dict[int, int]:
        """The prefix index as it stands: key → block (a copy)."""
        return dict(self._block_of)

    def lookup(self, block_hash: int) -> int | None:
        return self._block_of.get(block_hash)

    def register(self, block: int, block_hash: int) -> bool:
        """Record that block holds the full block keyed by block_hash (first holder wins); True if it is new."""
        if block_hash in self._block_of or self._hash_of[block] is not None:
            return False
        self._block_of[block_hash] = block
        self._hash_of[block] = block_hash
        return True

    def _evict(self, block: int) -> None:
        block_hash = self._hash_of[block]
        if block_hash is not None:
            del self._block_of[block_hash]
            self._hash_of[block] = None
            if self._on_evict is not None:
                self._on_evict(block_hash)

    def check_invariants(self, held: list[list[int]]) -> None:
        """free + used = usable; refcounts = holders; a block held twice is a cached prefix block."""
        counts = [0] * self.num_blocks
        for blocks in held:
            for block in blocks:
                counts[block] += 1
        assert counts[0] == 0 and 0 not in self._free, "the null block was handed out"
        assert counts == self._ref_counts, "reference counts disagree with the holders"
        assert all(c >= 0 for c in self._ref_counts)
        used = {b for b, c in enumerate(counts) if c > 0}
        assert not used & set(self._free), "a held block is on the free list"
        assert len(self._free) + len(used) == self.num_usable, f"{len(self._free)} free + {len(used)} used"
        for block, count in enumerate(counts):
            if count > 1:
                assert self._hash_of[block] is not None, f"block {block} is shared but not a cached prefix block"
        for block_hash, block in self._block_of.items():
            assert self._hash_of[block] == block_hash, "the prefix index disagrees with the blocks"
