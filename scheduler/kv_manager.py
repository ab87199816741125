"""Each request's blocks: prefix-cache hits at admission, growth per step, giving them all back."""

from __future__ import annotations

from scheduler.block_allocator import BlockAllocator
from scheduler.kv_events import KvEventLog
from scheduler.request import Request


class KvManager:
    def __init__(self, allocator: BlockAllocator, block_size: int, enable_prefix_caching: bool = True,
                 events: KvEventLog | None = None) -> None:
        self.allocator = allocator
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.events = events

    def blocks_to_add(self, request: Request, num_new_tokens: int) -> int:
        needed = -(-(request.num_computed_tokens + num_new_tokens) // self.block_size)
        return max(0, needed - len(request.block_ids))

    def can_allocate(self, request: Request, num_new_tokens: int) -> bool:
        return self.blocks_to_add(request, num_new_tokens) <= self.allocator.num_free

    def allocate(self, request: Request, num_new_tokens: int) -> None:
        if needed := self.blocks_to_add(request, num_new_tokens):
            request.block_ids.extend(self.allocator.allocate(needed))

    # --- prefix cache ---------------------------------------------------------------------

    def _extend_hashes(self, request: Request, num_blocks: int) -> None:
        """Chained hashes of the request's first num_blocks full blocks (computed once each)."""
        bs = self.block_size
        hashes = request.block_hashes
        parent = hashes[-1] if hashes else None
        for index in range(len(hashes), num_blocks):
            parent = hash((parent, tuple(request.token_ids(index * bs, (index + 1) * bs)), request.tenant,
                           request.cache_salt))
            hashes.append(parent)

    def cached_prefix(self, request: Request) -> list[int]:
        """Cached blocks that hold the start of the request; never its last token (it must be computed)."""
        if not self.enable_prefix_caching:
            return []
        max_blocks = (request.num_tokens - 1) // self.block_size
        self._extend_hashes(request, max_blocks)
        hits = []
        for block_hash in request.block_hashes[:max_blocks]:
            block = self.allocator.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    def can_admit(self, request: Request, hits: list[int], num_new_tokens: int) -> bool:
        """Room for the hits (those on the free list leave it) and the new tokens' blocks."""
        reclaimed = sum(1 for b in hits if self.allocator.ref_count(b) == 0)
        total_blocks = -(-(len(hits) * self.block_size + num_new_tokens) // self.block_size)
        return reclaimed + total_blocks - len(hits) <= self.allocator.num_free

    def admit(self, request: Request, hits: list[int]) -> None:
        self.allocator.touch(hits)
        request.block_ids = list(hits)
        request.num_computed_tokens = request.num_confirmed_tokens = len(hits) * self.block_size

    def cache_full_blocks(self, requests: list[Request], num_confirmed_tokens: list[int]) -> None:
        """Index the blocks that returned steps have completely written (each request's first
        num_confirmed_tokens tokens), for later requests to reuse."""
        if not self.enable_prefix_caching:
            return
        block_size, register = self.block_size, self.allocator.register
        for request, confirmed in zip(requests, num_confirmed_tokens):
            num_full = confirmed // block_size
            first = request.num_indexed_blocks
            if num_full <= first:
                continue
            if len(request.block_hashes) < num_full:
                self._extend_hashes(request, num_full)
            blocks, hashes = request.block_ids, request.block_hashes
            stored = [index for index in range(first, num_full) if register(blocks[index], hashes[index])]
            request.num_indexed_blocks = num_full
            if stored and self.events is not None:
                self._publish_runs(request, stored)

    def _publish_runs(self, request: Request, stored: list[int]) -> None:
        """Newly indexed blocks, published in runs of consecutive ones."""
        run_start = 0
        for at in range(1, len(stored) + 1):
            if at == len(stored) or stored[at] != stored[at - 1] + 1:
                self._publish_stored(request, stored[run_start:at])
                run_start = at

    def _publish_stored(self, request: Request, indexes: list[int]) -> None:
        assert self.events is not None
        bs, hashes = self.block_size, request.block_hashes
        parent = hashes[indexes[0] - 1] if indexes[0] > 0 else None
        blocks = [(hashes[i], request.token_ids(i * bs, (i + 1) * bs)) for i in indexes]
        self.events.stored(blocks, parent, bs, request.cache_salt, request.tenant)

    def free(self, request: Request) -> None:
        self.allocator.free(request.block_ids)
        request.block_ids = []
        request.num_blocks_on_worker = 0
        request.num_indexed_blocks = 0
