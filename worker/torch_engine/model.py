"""A Llama-family decoder (Llama 2/3, Mistral, Qwen2-style GQA, SmolLM2) over a paged KV cache.

Plain tensors and functional ops: each rank holds its shard (column-parallel q/k/v and
gate/up, row-parallel o and down with an all-reduce, vocabulary-parallel head).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from inflight.model_config import ModelConfig
from worker.parallel import Collectives, ShardPlan
from worker.torch_engine.batch import AttentionGroup, BatchInput
from worker.torch_engine.paged_attention import paged_decode_attention
from worker.torch_engine.projection import Projection
from worker.torch_engine.rope import RotaryTable
from worker.torch_engine.weights import WeightSource


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    post_attention_norm: torch.Tensor
    qkv: Projection  # [q_local + 2 * kv_local rows, hidden]: one matmul for q, k and v
    o: Projection    # [hidden, q_local] row-parallel
    gate_up: Projection  # [2 * intermediate_local, hidden]
    down: Projection  # [hidden, intermediate_local] row-parallel


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's LlamaRMSNorm: normalize in float32, cast back, then scale."""
    if x.dtype == torch.float32 and x.device.type == "cpu":
        # torch's own kernel: bit-for-bit the same result here in float32, in one op instead of six.
        return F.rms_norm(x, weight.shape, weight, eps)
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


class LlamaModel:
    def __init__(self, config: ModelConfig, weights: WeightSource, shard: ShardPlan,
                 collectives: Collectives, device: torch.device, dtype: torch.dtype, block_size: int = 16) -> None:
        self.config = config
        self.block_size = block_size
        self.collectives = collectives
        self.device, self.dtype = device, dtype
        q_heads = shard.query_heads(config.num_attention_heads)
        kv_heads = shard.kv_heads(config.num_attention_heads, config.num_key_value_heads)
        self.num_q_heads, self.num_kv_heads = len(q_heads), len(kv_heads)
        group = config.num_attention_heads // config.num_key_value_heads
        # Local KV head each local query head reads (GQA); uniform groups use SDPA's enable_gqa.
        kv_of_q = torch.tensor([h // group - kv_heads.start for h in q_heads], device=device)
        local_group = self.num_q_heads // self.num_kv_heads
        uniform = self.num_q_heads % self.num_kv_heads == 0 and torch.equal(
            kv_of_q, torch.arange(self.num_kv_heads, device=device).repeat_interleave(local_group))
        self._kv_of_q = None if uniform else kv_of_q
        self.rope = RotaryTable(config.head_dim, config.rope_theta, config.rope_scaling,
                                config.max_position_embeddings, device, dtype)
        self.vocab_rows = shard.rows(config.vocab_size)
        self.vocab_sizes = [len(ShardPlan(r, shard.tp_size).rows(config.vocab_size)) for r in range(shard.tp_size)]
        self._load(weights, shard, q_heads, kv_heads)

    def _load(self, weights: WeightSource, shard: ShardPlan, q_heads: range, kv_heads: range) -> None:
        c, d = self.config, self.config.head_dim

        def get(name: str, rows: range | None = None, cols: range | None = None) -> torch.Tensor:
            return weights.get(name, rows, cols).to(device=self.device, dtype=self.dtype)

        def projection(*parts: torch.Tensor) -> Projection:
            return Projection(parts[0] if len(parts) == 1 else torch.cat(parts), pack_for_cpu=True)

        q_rows = range(q_heads.start * d, q_heads.stop * d)
        kv_rows = range(kv_heads.start * d, kv_heads.stop * d)
        mlp_rows = shard.rows(c.intermediate_size)
        self.embed_tokens = get("model.embed_tokens.weight")
        head_name = "model.embed_tokens.weight" if c.tie_word_embeddings or not weights.has("lm_head.weight") else "lm_head.weight"
        self.lm_head = projection(get(head_name, self.vocab_rows))
        self.norm = get("model.norm.weight")
        self.layers: list[LayerWeights] = []
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}."
            self.layers.append(LayerWeights(
                input_norm=get(p + "input_layernorm.weight"),
                post_attention_norm=get(p + "post_attention_layernorm.weight"),
                qkv=projection(get(p + "self_attn.q_proj.weight", q_rows), get(p + "self_attn.k_proj.weight", kv_rows),
                               get(p + "self_attn.v_proj.weight", kv_rows)),
                o=projection(get(p + "self_attn.o_proj.weight", None, q_rows)),
                gate_up=projection(get(p + "mlp.gate_proj.weight", mlp_rows), get(p + "mlp.up_proj.weight", mlp_rows)),
                down=projection(get(p + "mlp.down_proj.weight", None, mlp_rows)),
            ))

    def weight_bytes(self) -> int:
        """Bytes of weights this rank holds (as loaded, whatever layout a CPU adds beside them)."""
        tensors = [self.embed_tokens, self.norm]
        projections = [self.lm_head]
        for layer in self.layers:
            tensors += [layer.input_norm, layer.post_attention_norm]
            projections += [layer.qkv, layer.o, layer.gate_up, layer.down]
        return sum(t.numel() * t.element_size() for t in tensors) + sum(p.nbytes for p in projections)

    def forward(self, batch: BatchInput, kv_cache: torch.Tensor) -> torch.Tensor:
        """Hidden states [T, hidden] for the batch's tokens; writes their K/V into kv_cache."""
        eps = self.config.rms_norm_eps
        hidden = F.embedding(batch.token_ids, self.embed_tokens)
        angles = self.rope.at(batch.positions)
        for layer, layer_cache in zip(self.layers, kv_cache):
            attn = self._attention(rms_norm(hidden, layer.input_norm, eps), layer, layer_cache, batch, angles)
            hidden = hidden + attn
            hidden = hidden + self._mlp(rms_norm(hidden, layer.post_attention_norm, eps), layer)
        return rms_norm(hidden, self.norm, eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary float32 logits for the given rows (gathered across ranks)."""
        local = self.lm_head(hidden).float()
        return self.collectives.all_gather_last_dim(local, self.vocab_sizes)

    def _attention(self, x: torch.Tensor, layer: LayerWeights, cache: torch.Tensor, batch: BatchInput,
                   angles: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        num_tokens, d = x.shape[0], self.config.head_dim
        q_size, kv_size = self.num_q_heads * d, self.num_kv_heads * d
        qkv = layer.qkv(x)
        # q and k rotate together: one pass over both, as [tokens, q heads + kv heads, head_dim].
        qk = self.rope.apply(qkv[:, : q_size + kv_size].view(num_tokens, self.num_q_heads + self.num_kv_heads, d),
                             *angles)
        q, k = qk[:, : self.num_q_heads], qk[:, self.num_q_heads :]
        cache[0][batch.slot_mapping] = k
        cache[1][batch.slot_mapping] = qkv[:, q_size + kv_size :].view(num_tokens, self.num_kv_heads, d)
        if batch.block_tables is not None:
            out = paged_decode_attention(q.contiguous(), cache[0], cache[1], batch.block_tables, batch.context_lens,
                                         self.block_size)
            return self.collectives.all_reduce(layer.o(out.view(num_tokens, q_size)))
        if len(batch.groups) == 1:
            out = self._gathered_attention(q, cache, batch.groups[0])
        else:
            out = q.new_empty(num_tokens, q_size)
            for group in batch.groups:
                out[group.token_index] = self._gathered_attention(q, cache, group)
        return self.collectives.all_reduce(layer.o(out))

    def _gathered_attention(self, q: torch.Tensor, cache: torch.Tensor, group: AttentionGroup) -> torch.Tensor:
        """Attention for one group: keys gathered from the cache into a padded [Bg, H, Lmax, d] view."""
        keys = self._gather_blocks(cache[0], group.key_blocks)    # [Bg, Hkv, Lmax, d]
        values = self._gather_blocks(cache[1], group.key_blocks)
        if group.all_decodes and self._kv_of_q is None:
            # One query per sequence: the query heads sharing a KV head become that head's query rows
            # ([Bg, Hkv, group, d]), so SDPA reads each gathered key once per KV head, not per query head.
            grouped = q.view(q.shape[0], self.num_kv_heads, -1, q.shape[-1])
            out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=group.attn_mask)
            return out.reshape(-1, self.num_q_heads * self.config.head_dim)
        queries = (q.unsqueeze(1) if group.all_decodes else q[group.query_index]).transpose(1, 2)  # [Bg, Hq, Qmax, d]
        if self._kv_of_q is None:
            out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=group.attn_mask,
                                                 enable_gqa=self.num_q_heads != self.num_kv_heads)
        else:
            out = F.scaled_dot_product_attention(queries, keys[:, self._kv_of_q], values[:, self._kv_of_q],
                                                 attn_mask=group.attn_mask)
        out = out.transpose(1, 2).reshape(-1, self.num_q_heads * self.config.head_dim)
        return out if group.all_decodes else out[group.output_index]

    def _gather_blocks(self, cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """[Bg, heads, max_blocks * block_size, d] from a [slots, heads, d] cache: one copy per block."""
        by_block = cache.view(-1, self.block_size, *cache.shape[1:])
        # index_select copies whole blocks (memcpy per block); advanced indexing copies element by element.
        gathered = by_block.index_select(0, blocks.flatten())
        return gathered.view(blocks.shape[0], -1, *cache.shape[1:]).transpose(1, 2)

    def _mlp(self, x: torch.Tensor, layer: LayerWeights) -> torch.Tensor:
        gate, up = layer.gate_up(x).chunk(2, dim=-1)
        return self.collectives.all_reduce(layer.down(F.silu(gate).mul_(up)))
