"""CUDA graphs for decode steps: one graph per batch-size bucket, replayed with new inputs.

A decode step launches ~50 kernels per layer; from Python that costs far more than the GPU
work at small batches. The graph holds the whole forward and the head; only five small input
vectors change per step, and block tables live on the GPU, one row per slot.
"""

from __future__ import annotations

import torch

from worker.torch_engine.batch import BatchInput
from worker.torch_engine.model import LlamaModel

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


class DecodeGraphs:
    def __init__(self, model: LlamaModel, kv_cache: torch.Tensor, max_num_seqs: int, max_blocks: int,
                 device: torch.device) -> None:
        self.model, self.kv_cache = model, kv_cache
        self.buckets = sorted({b for b in BUCKETS if b < max_num_seqs} | {max_num_seqs})
        size = self.buckets[-1]
        self.block_tables = torch.zeros(max_num_seqs, max_blocks, dtype=torch.int32, device=device)  # per slot
        self.token_ids = torch.zeros(size, dtype=torch.long, device=device)
        self.positions = torch.zeros(size, dtype=torch.long, device=device)
        self.slot_mapping = torch.zeros(size, dtype=torch.long, device=device)
        self.slot_ids = torch.zeros(size, dtype=torch.long, device=device)
        self.context_lens = torch.ones(size, dtype=torch.int32, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle()

    def _batch(self, size: int) -> BatchInput:
        return BatchInput(
            token_ids=self.token_ids[:size], positions=self.positions[:size], slot_mapping=self.slot_mapping[:size],
            sample_index=torch.arange(size, device=self.token_ids.device), sample_positions=[],
            block_tables=self.block_tables[self.slot_ids[:size]], context_lens=self.context_lens[:size],
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first so that the smaller ones reuse its memory pool."""
        for size in reversed(self.buckets):
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm up kernels and autotuning outside the capture
                    self._forward(size)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                logits = self._forward(size)
            self.graphs[size] = (graph, logits)
        torch.cuda.synchronize()

    def _forward(self, size: int) -> torch.Tensor:
        batch = self._batch(size)
        return self.model.logits(self.model.forward(batch, self.kv_cache))

    def set_blocks(self, slot: int, start: int, block_ids: list[int]) -> None:
        if block_ids:
            self.block_tables[slot, start : start + len(block_ids)] = torch.tensor(block_ids, dtype=torch.int32)

    @torch.inference_mode()
    def run(self, slot_ids: list[int], token_ids: list[int], positions: list[int], block_size: int,
            tables: list[list[int]]) -> torch.Tensor:
        """Logits [n, vocab] of a decode step: sequence i feeds token_ids[i] at positions[i]."""
        n = len(slot_ids)
        size = next(b for b in self.buckets if b >= n)
        pad = size - n
        slots = [table[p // block_size] * block_size + p % block_size for table, p in zip(tables, positions)]
        host = torch.tensor([token_ids + [0] * pad, positions + [0] * pad, slots + [0] * pad,
                             slot_ids + [slot_ids[0]] * pad, [p + 1 for p in positions] + [1] * pad], dtype=torch.long)
        device = host.pin_memory().to(self.token_ids.device, non_blocking=True)
        self.token_ids[:size].copy_(device[0])
        self.positions[:size].copy_(device[1])
        self.slot_mapping[:size].copy_(device[2])
        self.slot_ids[:size].copy_(device[3])
        self.context_lens[:size].copy_(device[4])
        graph, logits = self.graphs[size]
        graph.replay()
        return logits[:n]
