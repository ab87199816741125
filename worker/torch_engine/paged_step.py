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
from worker.step import Step
from worker.torch_engine.block_tables import DeviceBlockTables
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


def lay_out(step: Step, tables: np.ndarray, block_size: int) -> StepLayout:
    """Prompt chunks first, then single-token rows; tables[slot]: that slot's whole block table."""
    order = np.argsort(step.num_tokens == 1, kind="stable")  # stable: chunks keep their order
    lengths, computed, slots = step.num_tokens[order], step.num_computed_tokens[order], step.slot_ids[order]
    starts = np.concatenate(([0], np.cumsum(lengths)))
    ends = computed + lengths
    rows = np.arange(step.total_tokens)
    token_ids = step.token_ids[np.repeat(step.token_starts[:-1][order] - starts[:-1], lengths) + rows]
    positions = np.repeat(computed - starts[:-1], lengths) + rows
    token_slots = np.repeat(slots, lengths)
    num_prefill = int(np.count_nonzero(lengths > 1))
    sampled = np.flatnonzero(step.sample[order])
    return StepLayout(
        token_ids=feed_previous(token_ids, token_slots),
        positions=positions,
        slot_mapping=tables[token_slots, positions // block_size] * block_size + positions % block_size,
        prefill_query_start=starts[: num_prefill + 1],
        prefill_slots=slots[:num_prefill],
        prefill_lens=ends[:num_prefill],
        decode_rows=starts[num_prefill:-1],
        decode_slots=slots[num_prefill:],
        decode_lens=ends[num_prefill:],
        sample_rows=starts[sampled + 1] - 1,
        sample_positions=ends[sampled].tolist(),
        sampled_slots=slots[sampled].tolist(),
    )


def feed_previous(token_ids: np.ndarray, token_slots: np.ndarray) -> np.ndarray:
    """token_ids (copied if any changes) with each PREVIOUS_TOKEN as -1 - its slot, which resolve_previous
    reads from the device. token_slots: the slot each token belongs to."""
    previous = token_ids == PREVIOUS_TOKEN
    if not previous.any():
        return token_ids
    fed = token_ids.copy()
    fed[previous] = -1 - token_slots[previous]
    return fed


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
