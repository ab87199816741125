"""One step's ragged batch turned into the index tensors the model needs.

Tokens of all sequences are concatenated (no padding in the projections and MLPs).
Attention gathers each sequence's cache blocks through its block table into a
[sequences, max_blocks * block_size] view (whole blocks: one copy per block, not per token),
with a causal mask that starts at the sequence's num_computed_tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from worker.step import Step
from worker.torch_engine.paged_step import PagedAttention, feed_previous


@dataclass
class AttentionGroup:
    """Sequences whose attention is computed together, padded to the group's longest query and context.

    Decodes (one query each) and prompt chunks go in separate groups, so a decode never pays for
    a chunk's query padding.
    """

    token_index: torch.Tensor   # [Tg] the step's tokens that belong to this group, in order
    query_index: torch.Tensor   # [Bg, Qmax] token index of each sequence's i-th query (padding: 0)
    key_blocks: torch.Tensor    # [Bg, max_blocks] cache block of each sequence's keys, in order (padding: 0)
    attn_mask: torch.Tensor     # [Bg, 1, Qmax, max_blocks * block_size] 0 where query i may attend key j, else -inf
    output_index: torch.Tensor  # [Tg] row in the flattened [Bg*Qmax] output for each of token_index
    context_lens: torch.Tensor  # [Bg] keys each sequence attends to: its computed tokens plus this step's
    one_query_each: bool = False  # decodes: one query per sequence
    all_decodes: bool = False   # the step's tokens are all decodes, in order: no query or output indexing


@dataclass
class BatchInput:
    token_ids: torch.Tensor       # [T] the step's tokens, sequence after sequence
    positions: torch.Tensor       # [T] each token's position in its sequence
    slot_mapping: torch.Tensor    # [T] KV cache slot each token's K/V is written to
    sample_index: torch.Tensor    # [S] token index of the last token of each sampled sequence
    sample_positions: list[int]   # position of the token to be sampled, per sampled sequence
    groups: list[AttentionGroup] = field(default_factory=list)  # gathered attention (any mix)
    paged: PagedAttention | None = None  # attention straight from the paged cache instead (CUDA)

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])


def _tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).to(device, non_blocking=True)


def _group(members: np.ndarray, q_lens: np.ndarray, computed: np.ndarray, starts: np.ndarray,
           tables: np.ndarray, block_size: int, device: torch.device, dtype: torch.dtype) -> AttentionGroup:
    """tables[i]: sequence i's block table."""
    q, c, s = q_lens[members], computed[members], starts[members]
    ctx = c + q
    max_q = int(q.max())
    used_blocks = -(-ctx // block_size)
    width = int(used_blocks.max())
    key_blocks = np.where(np.arange(width)[None, :] < used_blocks[:, None], tables[members, :width], 0)
    offsets = np.arange(max_q)
    valid = offsets[None, :] < q[:, None]
    query_index = np.where(valid, s[:, None] + offsets[None, :], 0)
    query_pos = c[:, None] + offsets[None, :]
    attn_mask = np.arange(width * block_size)[None, None, :] <= query_pos[:, :, None]
    attn_mask[~valid] = False
    attn_mask[..., 0] |= ~valid  # padding queries attend one key, so no row is all -inf
    token_index = query_index[valid]      # row-major: each sequence's queries, in order
    output_index = np.flatnonzero(valid)  # their rows in the flattened [Bg*Qmax] output
    # Additive, in the model's dtype, made once on the device: SDPA would otherwise turn a boolean mask
    # into this in every layer.
    allowed = _tensor(attn_mask[:, None, :, :], device)
    additive = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
    all_decodes = max_q == 1 and len(members) == len(q_lens)
    return AttentionGroup(_tensor(token_index, device), _tensor(query_index, device), _tensor(key_blocks, device),
                          additive, _tensor(output_index, device), _tensor(ctx, device), max_q == 1, all_decodes)


def build_batch(step: Step, tables: np.ndarray, block_size: int, device: torch.device,
                dtype: torch.dtype = torch.float32) -> BatchInput:
    """The batch of a step's sequences; tables[slot]: that slot's whole block table. PREVIOUS_TOKEN comes out
    as -1 - slot, for resolve_previous."""
    q_lens, computed, slots = step.num_tokens, step.num_computed_tokens, step.slot_ids
    ctx_lens = computed + q_lens
    starts = step.token_starts[:-1]
    token_slots = np.repeat(slots, q_lens)
    positions = np.repeat(computed - starts, q_lens) + np.arange(step.total_tokens)
    slot_mapping = tables[token_slots, positions // block_size] * block_size + positions % block_size
    sequence_tables = tables[slots]
    decodes = np.flatnonzero(q_lens == 1)
    prompts = np.flatnonzero(q_lens > 1)
    groups = [_group(m, q_lens, computed, starts, sequence_tables, block_size, device, dtype)
              for m in (decodes, prompts) if len(m)]
    sampled = np.flatnonzero(step.sample)
    return BatchInput(
        token_ids=_tensor(feed_previous(step.token_ids, token_slots), device),
        positions=_tensor(positions, device),
        slot_mapping=_tensor(slot_mapping, device),
        sample_index=_tensor(starts[sampled] + q_lens[sampled] - 1, device),
        sample_positions=ctx_lens[sampled].tolist(),
        groups=groups,
    )
