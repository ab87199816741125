"""CUDA graphs for whole steps: one graph per token-count bucket, replayed with new inputs.

A step launches ~50 kernels per layer; from Python that costs far more than the GPU work unless
the step carries thousands of tokens. Each graph holds the whole forward and the head for up to
its bucket's tokens and min(bucket, max_num_seqs) sequences, decodes and prompt chunks alike
(worker/torch_engine/paged_step.py): a step is padded to the next bucket. Padded tokens write
their K/V into the null block; padded sequences have no queries (prefill) or a one-token context
whose output lands in a spare row (decode). Steps of more tokens than the largest bucket run
eagerly; their cost is arithmetic, not launches.
"""

from __future__ import annotations

import numpy as np
import torch

from worker.torch_engine.batch import BatchInput
from worker.torch_engine.block_tables import DeviceBlockTables
from worker.torch_engine.model import LlamaModel
from worker.torch_engine.paged_step import PagedAttention, StepLayout, resolve_previous

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 896, 1024,
           1280, 1536, 1792, 2048)


class StepGraphs:
    def __init__(self, model: LlamaModel, kv_cache: torch.Tensor, tables: DeviceBlockTables, last_tokens: torch.Tensor,
                 max_tokens: int) -> None:
        """last_tokens: the token each slot sampled last (one per slot), where PREVIOUS_TOKEN is read from."""
        self.model, self.kv_cache, self.tables, self.last_tokens = model, kv_cache, tables, last_tokens
        self.max_num_seqs = len(last_tokens)
        self.buckets = sorted({b for b in BUCKETS if b < max_tokens} | {max_tokens})
        device = kv_cache.device
        tokens, seqs = self.buckets[-1], min(self.buckets[-1], self.max_num_seqs)
        # Every per-step input in one int64 buffer, filled by one host-to-device copy.
        self._fields = {"token_ids": tokens, "positions": tokens, "slot_mapping": tokens,
                        "prefill_query_start": seqs + 1, "prefill_slots": seqs, "prefill_lens": seqs,
                        "decode_gather": seqs, "decode_scatter": seqs, "decode_slots": seqs, "decode_lens": seqs,
                        "sample_rows": seqs}
        self.inputs = torch.zeros(sum(self._fields.values()), dtype=torch.int64, device=device)
        offset, self._views = 0, {}
        for name, size in self._fields.items():
            self._views[name] = self.inputs[offset : offset + size]
            offset += size
        self.graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # (tokens, decode-only)

    @property
    def max_tokens(self) -> int:
        return self.buckets[-1]

    def _seqs(self, tokens: int) -> int:
        return min(tokens, self.max_num_seqs)

    def _batch(self, tokens: int, decode_only: bool) -> BatchInput:
        v, seqs = self._views, self._seqs(tokens)
        prefill_slots, decode_slots = v["prefill_slots"][:seqs], v["decode_slots"][:seqs]
        paged = PagedAttention(
            prefill_query_start=v["prefill_query_start"][: seqs + 1].int(),
            prefill_tables=self.tables.tables[:0] if decode_only else self.tables.tables.index_select(0, prefill_slots),
            prefill_lens=v["prefill_lens"][:seqs].int(),
            max_query_len=tokens,
            decode_gather=None if decode_only else v["decode_gather"][:seqs],  # decode-only: row i is decode i
            decode_scatter=v["decode_scatter"][:seqs],
            decode_tables=self.tables.tables.index_select(0, decode_slots),
            decode_lens=v["decode_lens"][:seqs].int(),
            has_prefill=not decode_only,
        )
        return BatchInput(token_ids=resolve_previous(v["token_ids"][:tokens], self.last_tokens),
                          positions=v["positions"][:tokens],
                          slot_mapping=v["slot_mapping"][:tokens], sample_index=v["sample_rows"][:seqs],
                          sample_positions=[], paged=paged)

    def _forward(self, tokens: int, decode_only: bool) -> torch.Tensor:
        batch = self._batch(tokens, decode_only)
        return self.model.logits(self.model.forward(batch, self.kv_cache)[batch.sample_index])

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first so that the smaller ones reuse its memory pool: a graph for
        steps with prompt chunks, and one for decode-only steps (no prefill kernel, no row gathers)."""
        pool = torch.cuda.graph_pool_handle()
        shapes = [(t, False) for t in self.buckets] + [(t, True) for t in self.buckets if t <= self.max_num_seqs]
        for tokens, decode_only in sorted(shapes, reverse=True):
            self._fill(_EMPTY, tokens)  # all padding: touches nothing but the null block
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm up kernels and autotuning outside the capture
                    self._forward(tokens, decode_only)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._forward(tokens, decode_only)
            self.graphs[tokens, decode_only] = (graph, logits)
        torch.cuda.synchronize()

    def _fill(self, layout: StepLayout, tokens: int) -> None:
        """The inputs of the bucket of `tokens`: the layout's values, then padding."""
        seqs = self._seqs(tokens)
        prefill_end = int(layout.prefill_query_start[-1])
        rows = {  # name: (values, padding, entries the bucket reads)
            "token_ids": (layout.token_ids, 0, tokens), "positions": (layout.positions, 0, tokens),
            "slot_mapping": (layout.slot_mapping, 0, tokens),
            "prefill_query_start": (layout.prefill_query_start, prefill_end, seqs + 1),
            "prefill_slots": (layout.prefill_slots, 0, seqs), "prefill_lens": (layout.prefill_lens, 0, seqs),
            "decode_gather": (layout.decode_rows, 0, seqs), "decode_scatter": (layout.decode_rows, tokens, seqs),
            "decode_slots": (layout.decode_slots, 0, seqs), "decode_lens": (layout.decode_lens, 1, seqs),
            "sample_rows": (layout.sample_rows, 0, seqs),
        }
        host = np.zeros(len(self.inputs), dtype=np.int64)
        offset = 0
        for name, size in self._fields.items():
            values, padding, used = rows[name]
            host[offset : offset + len(values)] = values
            host[offset + len(values) : offset + used] = padding
            offset += size
        staged = torch.from_numpy(host)
        self.inputs.copy_(staged.pin_memory() if self.inputs.is_cuda else staged, non_blocking=True)

    def run(self, layout: StepLayout) -> torch.Tensor:
        """Logits [S, vocab] of the layout's sampled rows, in its order (uncaptured: run the same padded
        forward without a graph, as tests on CPU do)."""
        tokens = next(b for b in self.buckets if b >= layout.num_tokens)
        decode_only = len(layout.prefill_slots) == 0 and tokens <= self.max_num_seqs
        self._fill(layout, tokens)
        if (tokens, decode_only) not in self.graphs:
            return self._forward(tokens, decode_only)[: len(layout.sample_rows)]
        graph, logits = self.graphs[tokens, decode_only]
        graph.replay()
        return logits[: len(layout.sample_rows)]


_NONE = np.zeros(0, dtype=np.int64)
_EMPTY = StepLayout(token_ids=_NONE, positions=_NONE, slot_mapping=_NONE, prefill_query_start=np.zeros(1, np.int64),
                    prefill_slots=_NONE, prefill_lens=_NONE, decode_rows=_NONE, decode_slots=_NONE,
                    decode_lens=_NONE, sample_rows=_NONE, sample_positions=[], sampled_slots=[])
