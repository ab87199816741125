"""One step's ragged batch turned into the index tensors the model needs.

Tokens of all sequences are concatenated (no padding in the projections and MLPs).
Attention gathers each sequence's keys from the paged cache through its block table
into a [sequences, max_context] view, with a causal mask that starts at the
sequence's num_computed_tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

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
class BatchInput:
    token_ids: torch.Tensor       # [T] the step's tokens, sequence after sequence
    positions: torch.Tensor       # [T] each token's position in its sequence
    slot_mapping: torch.Tensor    # [T] KV cache slot each token's K/V is written to
    sample_index: torch.Tensor    # [S] token index of the last token of each sampled sequence
    sample_positions: list[int]   # position of the token to be sampled, per sampled sequence
    # Gathered attention (any mix of prompt chunks and decodes):
    query_index: torch.Tensor | None = None   # [B, Qmax] token index of each sequence's i-th query (padding: 0)
    key_slots: torch.Tensor | None = None     # [B, Lmax] cache slot of each sequence's j-th key (padding: 0)
    attn_mask: torch.Tensor | None = None     # [B, 1, Qmax, Lmax] True where query i may attend key j
    output_index: torch.Tensor | None = None  # [T] row in the flattened [B*Qmax] attention output for each token
    # Paged decode attention (one token per sequence, CUDA): nothing depends on the context length.
    block_tables: torch.Tensor | None = None  # [B, max_blocks] int32
    context_lens: torch.Tensor | None = None  # [B] int32, tokens in the cache after this step's write

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])


def build_batch(chunks: list[SequenceChunk], block_size: int, device: torch.device) -> BatchInput:
    num_seqs = len(chunks)
    q_lens = np.array([len(c.token_ids) for c in chunks], dtype=np.int64)
    computed = np.array([c.num_computed_tokens for c in chunks], dtype=np.int64)
    ctx_lens = computed + q_lens
    max_q, max_ctx = int(q_lens.max()), int(ctx_lens.max())
    starts = np.concatenate(([0], np.cumsum(q_lens)[:-1]))

    token_ids = np.concatenate([np.asarray(c.token_ids, dtype=np.int64) for c in chunks])
    positions = np.concatenate([np.arange(c, c + q) for c, q in zip(computed, q_lens)])
    key_slots = np.zeros((num_seqs, max_ctx), dtype=np.int64)
    for b, chunk in enumerate(chunks):
        pos = np.arange(ctx_lens[b])
        table = np.asarray(chunk.block_table, dtype=np.int64)
        key_slots[b, : ctx_lens[b]] = table[pos // block_size] * block_size + pos % block_size
    seq_of_token = np.repeat(np.arange(num_seqs), q_lens)
    slot_mapping = key_slots[seq_of_token, positions]

    offsets = np.arange(max_q)
    query_valid = offsets[None, :] < q_lens[:, None]
    query_index = np.where(query_valid, starts[:, None] + offsets[None, :], 0)
    query_pos = computed[:, None] + offsets[None, :]
    attn_mask = np.arange(max_ctx)[None, None, :] <= query_pos[:, :, None]
    attn_mask[~query_valid] = False
    attn_mask[..., 0] |= ~query_valid  # padding queries attend one key, so no row is all -inf
    output_index = seq_of_token * max_q + (np.arange(len(token_ids)) - starts[seq_of_token])

    sampled = [b for b, c in enumerate(chunks) if c.sample]
    sample_index = np.array([starts[b] + q_lens[b] - 1 for b in sampled], dtype=np.int64)

    def tensor(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(device, non_blocking=True)

    return BatchInput(
        token_ids=tensor(token_ids),
        positions=tensor(positions),
        slot_mapping=tensor(slot_mapping),
        query_index=tensor(query_index),
        key_slots=tensor(key_slots),
        attn_mask=tensor(attn_mask[:, None, :, :]),
        output_index=tensor(output_index),
        sample_index=tensor(sample_index),
        sample_positions=[int(ctx_lens[b]) for b in sampled],
    )
