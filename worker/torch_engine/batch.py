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

from worker.torch_engine.paged_step import PagedAttention


@dataclass(frozen=True)
class SequenceChunk:
    """The tokens one sequence processes in this step."""

    token_ids: list[int]
    num_computed_tokens: int
    block_table: list[int]
    sample: bool


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
           tables: list[np.ndarray], block_size: int, device: torch.device, dtype: torch.dtype) -> AttentionGroup:
    q, c, s = q_lens[members], computed[members], starts[members]
    ctx = c + q
    max_q = int(q.max())
    used_blocks = -(-ctx // block_size)
    key_blocks = np.zeros((len(members), int(used_blocks.max())), dtype=np.int64)
    for row, b in enumerate(members):
        key_blocks[row, : used_blocks[row]] = tables[b][: used_blocks[row]]
    offsets = np.arange(max_q)
    valid = offsets[None, :] < q[:, None]
    query_index = np.where(valid, s[:, None] + offsets[None, :], 0)
    query_pos = c[:, None] + offsets[None, :]
    attn_mask = np.arange(key_blocks.shape[1] * block_size)[None, None, :] <= query_pos[:, :, None]
    attn_mask[~valid] = False
    attn_mask[..., 0] |= ~valid  # padding queries attend one key, so no row is all -inf
    token_index = np.concatenate([np.arange(st, st + n) for st, n in zip(s, q)])
    output_index = np.repeat(np.arange(len(members)), q) * max_q + np.concatenate([np.arange(n) for n in q])
    # Additive, in the model's dtype, made once on the device: SDPA would otherwise turn a boolean mask
    # into this in every layer.
    allowed = _tensor(attn_mask[:, None, :, :], device)
    additive = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
    all_decodes = max_q == 1 and len(members) == len(q_lens)
    return AttentionGroup(_tensor(token_index, device), _tensor(query_index, device), _tensor(key_blocks, device),
                          additive, _tensor(output_index, device), all_decodes)


def build_batch(chunks: list[SequenceChunk], block_size: int, device: torch.device,
                dtype: torch.dtype = torch.float32) -> BatchInput:
    q_lens = np.array([len(c.token_ids) for c in chunks], dtype=np.int64)
    computed = np.array([c.num_computed_tokens for c in chunks], dtype=np.int64)
    ctx_lens = computed + q_lens
    starts = np.concatenate(([0], np.cumsum(q_lens)[:-1]))
    token_ids = np.concatenate([np.asarray(c.token_ids, dtype=np.int64) for c in chunks])
    each_positions = [np.arange(c, c + q) for c, q in zip(computed, q_lens)]
    positions = np.concatenate(each_positions)
    tables = [np.asarray(chunk.block_table, dtype=np.int64) for chunk in chunks]
    slot_mapping = np.concatenate([table[pos // block_size] * block_size + pos % block_size
                                   for table, pos in zip(tables, each_positions)])
    decodes = np.flatnonzero(q_lens == 1)
    prompts = np.flatnonzero(q_lens > 1)
    groups = [_group(m, q_lens, computed, starts, tables, block_size, device, dtype) for m in (decodes, prompts) if len(m)]
    sampled = [b for b, c in enumerate(chunks) if c.sample]
    sample_index = np.array([starts[b] + q_lens[b] - 1 for b in sampled], dtype=np.int64)
    return BatchInput(
        token_ids=_tensor(token_ids, device),
        positions=_tensor(positions, device),
        slot_mapping=_tensor(slot_mapping, device),
        sample_index=_tensor(sample_index, device),
        sample_positions=[int(ctx_lens[b]) for b in sampled],
        groups=groups,
    )
