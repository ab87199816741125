"""Tensor-parallel layout: which heads and rows a rank owns, and the collectives between ranks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from worker.peer_all_reduce import PeerAllReduce

# A residual add fused with the RMSNorm after it: (x or None, residual (updated in place), weight, eps) -> normed.
AddNorm = Callable[[torch.Tensor | None, torch.Tensor, torch.Tensor, float], torch.Tensor]


@dataclass(frozen=True)
class ShardPlan:
    """This rank's slice of a Llama model split across tp_size ranks."""

    rank: int
    tp_size: int

    def query_heads(self, num_heads: int) -> range:
        if num_heads % self.tp_size:
            raise ValueError(f"{num_heads} attention heads cannot be split across tp={self.tp_size} ranks")
        per_rank = num_heads // self.tp_size
        return range(self.rank * per_rank, (self.rank + 1) * per_rank)

    def kv_heads(self, num_heads: int, num_kv_heads: int) -> range:
        """The KV heads this rank's query heads read: a split where tp divides them, else replicas."""
        heads = self.query_heads(num_heads)
        group = num_heads // num_kv_heads
        return range(heads.start // group, (heads.stop - 1) // group + 1)

    def rows(self, total: int) -> range:
        """A near-even contiguous split of total rows (MLP columns, vocabulary)."""
        per_rank = -(-total // self.tp_size)
        start = min(self.rank * per_rank, total)
        return range(start, min(start + per_rank, total))


class Collectives:
    """All-reduce and all-gather over torch.distributed; no-ops for a single rank.

    peer: all-reduces that fit go through GPU peer memory in one kernel (worker/peer_all_reduce.py),
    the rest through NCCL.
    """

    def __init__(self, tp_size: int, peer: PeerAllReduce | None = None) -> None:
        self.tp_size = tp_size
        self.peer = peer

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over ranks: tensor itself, reduced in place, or a new tensor."""
        if self.tp_size == 1:
            return tensor
        if self.peer is not None and self.peer.fits(tensor):
            return self.peer(tensor)
        dist.all_reduce(tensor)
        return tensor

    def all_reduce_add_norm(self, partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                            add_norm: AddNorm, slot: int) -> torch.Tensor:
        """add_norm(sum over ranks of partial, residual, weight, eps): residual += the sum, in place, and its
        RMSNorm returned. One kernel through peer memory where it fits (worker/peer_add_norm.py; slot: which
        half of its buffer, alternating from call to call), else all_reduce then add_norm."""
        fused = self.peer.add_norm if self.tp_size > 1 and self.peer is not None else None
        if fused is not None and fused.fits(partial, residual):
            return fused(partial, residual, weight, eps, slot)
        return add_norm(self.all_reduce(partial), residual, weight, eps)

    def all_gather_last_dim(self, tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Concatenate each rank's [..., sizes[r]] slice along the last dimension."""
        if self.tp_size == 1:
            return tensor
        width = max(sizes)
        padded = torch.nn.functional.pad(tensor, (0, width - tensor.shape[-1]))
        parts = [torch.empty_like(padded) for _ in range(self.tp_size)]
        dist.all_gather(parts, padded)
        return torch.cat([part[..., :size] for part, size in zip(parts, sizes)], dim=-1)
