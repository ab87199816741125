"""One step's ragged batch turned into the index tensors the model needs.

Tokens of all sequences are concatenated (no padding in the projections and MLPs).
Attention gathers each sequence's keys from the paged cache through its block table
into a [sequences, max_context] view, with a causal mask that starts at the
sequence's num_computed_tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


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
    key_slots: torch.Tensor     # [Bg, Lmax] cache slot of each sequence's j-th key (padding: 0)
    attn_mask: torch.Tensor     # [Bg, 1, Qmax, Lmax] True where query i may attend key j
    output_index: torch.Tensor  # [Tg] row in the flattened [Bg*Qmax] output for each of token_index


@dataclass
class BatchInput:
    token_ids: torch.Tensor       # [T] the step's tokens, sequence after sequence
    positions: torch.Tensor       # [T] each token's position in its sequence
    slot_mapping: torch.Tensor    # [T] KV cache slot each token's K/V is written to
    sample_index: torch.Tensor    # [S] token index of the last token of each sampled sequence
    sample_positions: list[int]   # position of the token to be sampled, per sampled sequence
    groups: list[AttentionGroup] = field(default_factory=list)  # gathered attention (any mix)
    # Paged decode attention (one token per sequence, CUDA): nothing depends on the context length.
    block_tables: torch.Tensor | None = None  # [B, max_blocks] int32
    context_lens: torch.Tensor | None = None  # [B] int32, tokens in the cache after this step's write

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])


def _tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).to(device, non_blocking=True)


def _group(members: np.ndarray, q_lens: np.ndarray, computed: np.ndarray, starts: np.ndarray,
           key_slots_all: list[np.ndarray], device: torch.device) -> AttentionGroup:
    q, c, s = q_lens[members], computed[members], starts[members]
    ctx = c + q
    max_q, max_ctx = int(q.max()), int(ctx.max())
    key_slots = np.zeros((len(members), max_ctx), dtype=np.int64)
    for row, b in enumerate(members):
        key_slots[row, : ctx[row]] = key_slots_all[b]
    offsets = np.arange(max_q)
    valid = offsets[None, :] < q[:, None]
    query_index = np.where(valid, s[:, None] + offsets[None, :], 0)
    query_pos = c[:, None] + offsets[None, :]
    attn_mask = np.arange(max_ctx)[None, None, :] <= query_pos[:, :, None]
    attn_mask[~valid] = False
    attn_mask[..., 0] |= ~valid  # padding queries attend one key, so no row is all -inf
    token_index = np.concatenate([np.arange(st, st + n) for st, n in zip(s, q)])
    output_index = np.repeat(np.arange(len(members)), q) * max_q + np.concatenate([np.arange(n) for n in q])
    return AttentionGroup(_tensor(token_index, device), _tensor(query_index, device), _tensor(key_slots, device),
                          _tensor(attn_mask[:, None, :, :], device), _tensor(output_index, device))


def build_batch(chunks: list[SequenceChunk], block_size: int, device: torch.device) -> BatchInput:
    q_lens = np.array([len(c.token_ids) for c in chunks], dtype=np.int64)
    computed = np.array([c.num_computed_tokens for c in chunks], dtype=np.int64)
    ctx_lens = computed + q_lens
    starts = np.concatenate(([0], np.cumsum(q_lens)[:-1]))
    token_ids = np.concatenate([np.asarray(c.token_ids, dtype=np.int64) for c in chunks])
    positions = np.concatenate([np.arange(c, c + q) for c, q in zip(computed, q_lens)])
    key_slots = []
    for chunk, length in zip(chunks, ctx_lens):
        pos = np.arange(length)
        key_slots.append(np.asarray(chunk.block_table, dtype=np.int64)[pos // block_size] * block_size + pos % block_size)
    slot_mapping = np.concatenate([slots[c:] for slots, c in zip(key_slots, computed)])
    decodes = np.flatnonzero(q_lens == 1)
    prompts = np.flatnonzero(q_lens > 1)
    groups = [_group(m, q_lens, computed, starts, key_slots, device) for m in (decodes, prompts) if len(m)]
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
