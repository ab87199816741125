"""A step laid out for attention straight from the paged KV cache (CUDA): one forward per step.

The step's prompt chunks come first, their queries contiguous from row 0; single-token rows
(decodes, and a prompt's last token after a prefix-cache hit) follow. In every layer the chunks'
rows go to the paged prefill kernel and the single-token rows to the split-KV decode kernel, so
a step that mixes the two still makes one pass over the weights: one GEMM per projection for all
of its tokens.

Nothing here depends on the step's data but the values, so a graph captured for a token count
replays any step of at most that many tokens (the rest is padding, see StepGraphs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from inflight.step_contract import PREVIOUS_TOKEN
from worker.step import ScheduledChunk
from worker.torch_engine.transfer import to_device


@dataclass
class PagedAttention:
    """Each layer's attention inputs; every index is a row of the step's tokens."""

    prefill_query_start: torch.Tensor  # [Bp + 1] int32, the chunks' first query rows (0 first; padding repeats the end)
    prefill_tables: torch.Tensor       # [Bp, max_blocks] int32
    prefill_lens: torch.Tensor         # [Bp] int32, tokens in the cache after this step (padding: 0)
    max_query_len: int                 # an upper bound on the chunks' query lengths
    decode_gather: torch.Tensor | None  # [Bd] int64, row of each single-token query (padding: 0); None: row i
    decode_scatter: torch.Tensor       # [Bd] int64, row its output goes to (padding: the spare row T)
    decode_tables: torch.Tensor        # [Bd, max_blocks] int32
    decode_lens: torch.Tensor          # [Bd] int32 (padding: 1)
    has_prefill: bool = True
    has_decodes: bool = True


@dataclass
class StepLayout:
    """The step on the host, as arrays: what the device buffers are filled from."""

    token_ids: np.ndarray            # [T] (-1 - slot: the token that slot sampled last, see resolve_previous)
    positions: np.ndarray            # [T]
    slot_mapping: np.ndarray         # [T] cache slot each token's K/V goes to
    prefill_query_start: np.ndarray  # [Bp + 1]
    prefill_slots: np.ndarray        # [Bp] engine slot of each chunk (its block-table row)
    prefill_lens: np.ndarray         # [Bp]
    decode_rows: np.ndarray          # [Bd]
    decode_slots: np.ndarray         # [Bd]
    decode_lens: np.ndarray          # [Bd]
    sample_rows: np.ndarray          # [S] row of the last token of each sampled chunk
    sample_positions: list[int]      # position of the token each sampled row predicts
    sampled_slots: list[int]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def max_query_len(self) -> int:
        return int(np.diff(self.prefill_query_start).max()) if len(self.prefill_slots) else 1


def lay_out(chunks: list[ScheduledChunk], tables: dict[int, list[int]], block_size: int) -> StepLayout:
    """Prompt chunks first, then single-token rows; tables: each slot's whole block table."""
    ordered = sorted(chunks, key=lambda c: len(c.token_ids) == 1)  # stable: chunks keep their order
    lengths = np.array([len(c.token_ids) for c in ordered], dtype=np.int64)
    starts = np.concatenate(([0], np.cumsum(lengths)))
    computed = np.array([c.num_computed_tokens for c in ordered], dtype=np.int64)
    positions = np.concatenate([np.arange(c, c + n) for c, n in zip(computed, lengths)])
    slot_mapping = np.concatenate([np.asarray(tables[c.slot_id], dtype=np.int64)[p // block_size] * block_size
                                   + p % block_size
                                   for c, p in zip(ordered, np.split(positions, starts[1:-1]))])
    slots = np.array([c.slot_id for c in ordered], dtype=np.int64)
    ends = computed + lengths
    num_prefill = int(np.count_nonzero(lengths > 1))
    sampled = [i for i, c in enumerate(ordered) if c.sample]
    token_ids = np.concatenate([np.asarray(c.token_ids, dtype=np.int64) for c in ordered])
    previous = token_ids == PREVIOUS_TOKEN
    if previous.any():
        token_ids[previous] = -1 - np.repeat(slots, lengths)[previous]
    return StepLayout(
        token_ids=token_ids,
        positions=positions,
        slot_mapping=slot_mapping,
        prefill_query_start=starts[: num_prefill + 1],
        prefill_slots=slots[:num_prefill],
        prefill_lens=ends[:num_prefill],
        decode_rows=starts[num_prefill:-1],
        decode_slots=slots[num_prefill:],
        decode_lens=ends[num_prefill:],
        sample_rows=np.array([starts[i + 1] - 1 for i in sampled], dtype=np.int64),
        sample_positions=[int(ends[i]) for i in sampled],
        sampled_slots=[ordered[i].slot_id for i in sampled],
    )


class DeviceBlockTables:
    """Every slot's block table on the device, one row per slot, grown as blocks are appended.

    A step's appends are written together by flush(): one host-to-device copy, not one per sequence.
    """

    def __init__(self, num_slots: int, max_blocks: int, device: torch.device) -> None:
        self.tables = torch.zeros(num_slots, max_blocks, dtype=torch.int32, device=device)
        self._pending: list[tuple[int, int, list[int]]] = []

    def append(self, slot: int, start: int, block_ids: list[int]) -> None:
        if block_ids:
            self._pending.append((slot, start, block_ids))

    def flush(self) -> None:
        if not self._pending:
            return
        rows = [slot for slot, _, ids in self._pending for _ in ids]
        columns = [start + i for _, start, ids in self._pending for i in range(len(ids))]
        values = [block for _, _, ids in self._pending for block in ids]
        self._pending = []
        staged = to_device([rows, columns, values], self.tables.device)
        self.tables.index_put_((staged[0], staged[1]), staged[2].to(torch.int32))


def resolve_previous(token_ids: torch.Tensor, last_tokens: torch.Tensor) -> torch.Tensor:
    """token_ids with each -1 - slot replaced by the token that slot sampled last (read on the device, so the
    step can be launched before the previous step's tokens reach the host)."""
    fed = last_tokens.index_select(0, (-1 - token_ids).clamp_(min=0))
    return torch.where(token_ids < 0, fed, token_ids)


def eager_attention(layout: StepLayout, tables: DeviceBlockTables) -> PagedAttention:
    """The attention inputs of one step run eagerly: exactly its rows, no padding."""
    device = tables.tables.device
    prefill_slots = to_device(layout.prefill_slots, device)
    decode_slots = to_device(layout.decode_slots, device)
    decode_rows = to_device(layout.decode_rows, device)
    return PagedAttention(
        prefill_query_start=to_device(layout.prefill_query_start, device, torch.int32),
        prefill_tables=tables.tables.index_select(0, prefill_slots),
        prefill_lens=to_device(layout.prefill_lens, device, torch.int32),
        max_query_len=layout.max_query_len,
        decode_gather=decode_rows,
        decode_scatter=decode_rows,
        decode_tables=tables.tables.index_select(0, decode_slots),
        decode_lens=to_device(layout.decode_lens, device, torch.int32),
        has_prefill=len(layout.prefill_slots) > 0,
        has_decodes=len(layout.decode_slots) > 0,
    )
