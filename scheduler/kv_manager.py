"""Each request's blocks: how many more its next tokens need, and giving them all back."""

from __future__ import annotations

from scheduler.block_allocator import BlockAllocator
from scheduler.request import Request


class KvManager:
    def __init__(self, allocator: BlockAllocator, block_size: int) -> None:
        self.allocator = allocator
        self.block_size = block_size

    def blocks_to_add(self, request: Request, num_new_tokens: int) -> int:
        needed = -(-(request.num_computed_tokens + num_new_tokens) // self.block_size)
        return max(0, needed - len(request.block_ids))

    def can_allocate(self, request: Request, num_new_tokens: int) -> bool:
        return self.blocks_to_add(request, num_new_tokens) <= self.allocator.num_free

    def allocate(self, request: Request, num_new_tokens: int) -> None:
        request.block_ids.extend(self.allocator.allocate(self.blocks_to_add(request, num_new_tokens)))

    def free(self, request: Request) -> None:
        self.allocator.free(request.block_ids)
        request.block_ids = []
        request.num_blocks_on_worker = 0
