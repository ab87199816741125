"""A Llama-family decoder (Llama 2/3, Mistral, Mixtral, Qwen2-style GQA, SmolLM2) over a paged KV cache.

Plain tensors and functional ops: each rank holds its shard (column-parallel q/k/v and
gate/up, row-parallel o and down with an all-reduce, vocabulary-parallel head). Mixtral puts a
mixture of experts (worker/torch_engine/mlp.py) where Llama has its MLP; MPT (mpt.py) reuses this
attention with ALiBi in place of rotary positions.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from inflight.model_config import ModelConfig
from worker.parallel import AddNorm, Collectives, ShardPlan
from worker.torch_engine import cpu_kernels, fused_moe
from worker.torch_engine.batch import AttentionGroup, BatchInput
from worker.torch_engine.fused import add_rms_norm, rope_and_cache
from worker.torch_engine.mlp import GatedMlp, GeluMlp, MixtureOfExperts
from worker.torch_engine.paged_attention import paged_decode_attention, paged_prefill_attention
from worker.torch_engine.paged_step import PagedAttention
from worker.torch_engine.projection import Projection
from worker.torch_engine.rope import RotaryTable
from worker.torch_engine.weights import WeightSource


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    post_attention_norm: torch.Tensor
    qkv: Projection  # [q_local + 2 * kv_local rows, hidden]: one matmul for q, k and v
    o: Projection    # [hidden, q_local] row-parallel
    mlp: GatedMlp | GeluMlp | MixtureOfExperts  # this rank's partial sum; the model all-reduces it


# One layer's attention block: (normed rows, the layer, its cache) -> this rank's part of its output.
LayerAttention = Callable[[torch.Tensor, "LayerWeights", torch.Tensor], torch.Tensor]


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
        self.rope: RotaryTable | None = None if config.uses_alibi else RotaryTable(
            config.head_dim, config.rope_theta, config.rope_scaling, config.max_position_embeddings, device, dtype)
        self.alibi_slopes: torch.Tensor | None = None  # [q_local] per head, where positions are ALiBi's
        self.clip_qkv: float | None = None
        self.softmax_scale: float | None = None  # None: 1 / sqrt(head_dim)
        self.vocab_rows = shard.rows(config.vocab_size)
        self.vocab_sizes = [len(ShardPlan(r, shard.tp_size).rows(config.vocab_size)) for r in range(shard.tp_size)]
        self._load(weights, shard, q_heads, kv_heads)

    def _get(self, weights: WeightSource) -> Getter:
        def get(name: str, rows: range | None = None, cols: range | None = None) -> torch.Tensor:
            return weights.get(name, rows, cols).to(device=self.device, dtype=self.dtype)
        return get

    def _load(self, weights: WeightSource, shard: ShardPlan, q_heads: range, kv_heads: range) -> None:
        c, d = self.config, self.config.head_dim
        get = self._get(weights)
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
            if c.num_experts:
                moe = p + "block_sparse_moe."
                experts = range(c.num_experts)
                mlp: GatedMlp | MixtureOfExperts = MixtureOfExperts(
                    get(moe + "gate.weight"),
                    torch.stack([torch.cat((get(f"{moe}experts.{e}.w1.weight", mlp_rows),
                                            get(f"{moe}experts.{e}.w3.weight", mlp_rows))) for e in experts]),
                    torch.stack([get(f"{moe}experts.{e}.w2.weight", None, mlp_rows) for e in experts]),
                    c.num_experts_per_tok)
            else:
                mlp = GatedMlp(projection(get(p + "mlp.gate_proj.weight", mlp_rows), get(p + "mlp.up_proj.weight", mlp_rows)),
                               projection(get(p + "mlp.down_proj.weight", None, mlp_rows)))
            self.layers.append(LayerWeights(
                input_norm=get(p + "input_layernorm.weight"),
                post_attention_norm=get(p + "post_attention_layernorm.weight"),
                qkv=projection(get(p + "self_attn.q_proj.weight", q_rows), get(p + "self_attn.k_proj.weight", kv_rows),
                               get(p + "self_attn.v_proj.weight", kv_rows)),
                o=projection(get(p + "self_attn.o_proj.weight", None, q_rows)),
                mlp=mlp,
            ))

    @property
    def uniform_gqa(self) -> bool:
        """Whether local query head h reads local KV head h // group, as the paged kernels assume."""
        return self._kv_of_q is None

    @property
    def graph_safe(self) -> bool:
        """Whether a decode step may be captured in a CUDA graph with the paged decode kernel."""
        # Experts run graph-safe only as fused_moe's kernels; the loop reads its token counts on the host.
        return not self.config.num_experts or fused_moe.available(self.device)

    def projections(self) -> list[Projection]:
        """Every dense projection: the layers' attention and MLP matrices, and the head."""
        found = [self.lm_head]
        for layer in self.layers:
            found += [layer.qkv, layer.o]
            if isinstance(layer.mlp, GatedMlp):
                found += [layer.mlp.gate_up, layer.mlp.down]
            elif isinstance(layer.mlp, GeluMlp):
                found += [layer.mlp.up, layer.mlp.down]
        return found

    def weight_bytes(self, experts_touched: int | None = None) -> int:
        """Bytes of weights this rank holds (as loaded, whatever layout a CPU adds beside them).

        experts_touched: count only that many experts per mixture-of-experts layer, as a step whose
        tokens route to that many reads them (one token: num_experts_per_tok).
        """
        tensors = [self.embed_tokens, self.norm]
        total = self.lm_head.nbytes
        for layer in self.layers:
            tensors += [layer.input_norm, layer.post_attention_norm]
            total += layer.qkv.nbytes + layer.o.nbytes
            mlp = layer.mlp
            total += mlp.touched_nbytes(experts_touched) if isinstance(mlp, MixtureOfExperts) and experts_touched \
                else mlp.nbytes
        return total + sum(t.numel() * t.element_size() for t in tensors)

    def forward(self, batch: BatchInput, kv_cache: torch.Tensor) -> torch.Tensor:
        """Hidden states [T, hidden] for the batch's tokens; writes their K/V into kv_cache."""
        hidden = F.embedding(batch.token_ids, self.embed_tokens)
        llama_norm = type(self)._norm is LlamaModel._norm  # not a family with its own norm (MPT's LayerNorm)
        if batch.paged is not None:  # fused kernels (worker/torch_engine/fused.py) around the paged ones
            attention: LayerAttention = functools.partial(self._paged_layer_attention, batch=batch)
            return self._layers(hidden, kv_cache, attention, add_rms_norm if llama_norm else None)
        angles = self.rope.at(batch.positions) if self.rope is not None else None
        masks = self._attention_masks(batch)

        def attention(x: torch.Tensor, layer: LayerWeights, cache: torch.Tensor) -> torch.Tensor:
            return self._attention(x, layer, cache, batch, angles, masks)

        fused = llama_norm and cpu_kernels.elementwise_applies(hidden)  # bfloat16 on CPU: cpu_elementwise.cpp
        return self._layers(hidden, kv_cache, attention, cpu_kernels.add_rms_norm if fused else None)

    def _layers(self, hidden: torch.Tensor, kv_cache: torch.Tensor, attention: LayerAttention,
                add_norm: AddNorm | None) -> torch.Tensor:
        """The decoder layers and the final norm over hidden [T, hidden]. add_norm: a residual add fused with
        the RMSNorm that follows it (hidden, the residual, updated in place), or None for torch's ops."""
        if add_norm is None:
            for layer, layer_cache in zip(self.layers, kv_cache):
                hidden = hidden + self.collectives.all_reduce(attention(self._norm(hidden, layer.input_norm), layer,
                                                                        layer_cache))
                hidden = hidden + self.collectives.all_reduce(layer.mlp(self._norm(hidden, layer.post_attention_norm)))
            return self._norm(hidden, self.norm)
        eps = self.config.rms_norm_eps
        reduce_add_norm = self.collectives.all_reduce_add_norm
        normed = add_norm(None, hidden, self.layers[0].input_norm, eps)
        for index, (layer, layer_cache) in enumerate(zip(self.layers, kv_cache)):
            # slot 0 / 1: the two halves of a layer alternate, as the peer kernel's buffer halves must
            normed = reduce_add_norm(attention(normed, layer, layer_cache), hidden, layer.post_attention_norm, eps,
                                     add_norm, slot=0)
            following = self.layers[index + 1].input_norm if index + 1 < len(self.layers) else self.norm
            normed = reduce_add_norm(layer.mlp(normed), hidden, following, eps, add_norm, slot=1)
        return normed

    def _paged_layer_attention(self, x: torch.Tensor, layer: LayerWeights, cache: torch.Tensor,
                               batch: BatchInput) -> torch.Tensor:
        assert batch.paged is not None
        qkv = layer.qkv(x)
        if self.clip_qkv is not None:
            qkv = qkv.clamp_(-self.clip_qkv, self.clip_qkv)
        rope = self.rope
        q = rope_and_cache(qkv, rope.cos if rope else None, rope.signed_sin if rope else None, batch.positions,
                           batch.slot_mapping, cache, self.num_q_heads, self.num_kv_heads)
        out = self._paged_attention(q, cache, batch.paged)
        return layer.o(out.view(x.shape[0], -1))

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, weight, self.config.rms_norm_eps)

    def _attention_masks(self, batch: BatchInput) -> list[torch.Tensor]:
        """Each attention group's additive mask, shared by every layer: causal, plus ALiBi's bias where used."""
        if self.alibi_slopes is None:
            return [group.attn_mask for group in batch.groups]
        masks = []
        for group in batch.groups:
            queries = batch.positions.view(-1, 1) if group.all_decodes else batch.positions[group.query_index]
            keys = torch.arange(group.attn_mask.shape[-1], device=self.device)
            distance = (keys[None, None, :] - queries[:, :, None]).to(self.dtype)  # [Bg, Qmax, L]
            masks.append(group.attn_mask + self.alibi_slopes[None, :, None, None] * distance[:, None])
        return masks

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary float32 logits for the given rows (gathered across ranks)."""
        local = self.lm_head(hidden).float()
        return self.collectives.all_gather_last_dim(local, self.vocab_sizes)

    def _attention(self, x: torch.Tensor, layer: LayerWeights, cache: torch.Tensor, batch: BatchInput,
                   angles: tuple[torch.Tensor, torch.Tensor] | None, masks: list[torch.Tensor]) -> torch.Tensor:
        num_tokens, d = x.shape[0], self.config.head_dim
        q_size, kv_size = self.num_q_heads * d, self.num_kv_heads * d
        qkv = layer.qkv(x)
        if self.clip_qkv is not None:
            qkv = qkv.clamp_(-self.clip_qkv, self.clip_qkv)
        qk = qkv[:, : q_size + kv_size].view(num_tokens, self.num_q_heads + self.num_kv_heads, d)
        if angles is not None:
            # q and k rotate together: one pass over both, as [tokens, q heads + kv heads, head_dim].
            qk = RotaryTable.apply(qk, *angles)
        q, k = qk[:, : self.num_q_heads], qk[:, self.num_q_heads :]
        cache[0][batch.slot_mapping] = k
        cache[1][batch.slot_mapping] = qkv[:, q_size + kv_size :].view(num_tokens, self.num_kv_heads, d)
        if len(batch.groups) == 1:
            out = self._gathered_attention(q, cache, batch.groups[0], masks[0])
        else:
            out = q.new_empty(num_tokens, q_size)
            for group, mask in zip(batch.groups, masks):
                out[group.token_index] = self._gathered_attention(q, cache, group, mask)
        return layer.o(out)

    def _paged_attention(self, q: torch.Tensor, cache: torch.Tensor, paged: PagedAttention) -> torch.Tensor:
        """Prompt chunks' rows through the prefill kernel, single-token rows through the decode kernel."""
        if paged.decode_gather is None:  # a decode-only step: row i is decode i
            return paged_decode_attention(q, cache[0], cache[1], paged.decode_tables, paged.decode_lens,
                                          self.block_size, self.alibi_slopes, self.softmax_scale)
        num_tokens = q.shape[0]
        out = q.new_empty(num_tokens + 1, *q.shape[1:])  # the spare last row takes padded decodes' outputs
        if paged.has_prefill:
            paged_prefill_attention(q, cache[0], cache[1], paged.prefill_tables, paged.prefill_query_start,
                                    paged.prefill_lens, self.block_size, paged.max_query_len, self.alibi_slopes,
                                    self.softmax_scale, out=out)
        if paged.has_decodes:
            decoded = paged_decode_attention(q.index_select(0, paged.decode_gather), cache[0], cache[1],
                                             paged.decode_tables, paged.decode_lens, self.block_size,
                                             self.alibi_slopes, self.softmax_scale)
            out.index_copy_(0, paged.decode_scatter, decoded)
        return out[:num_tokens]

    def _gathered_attention(self, q: torch.Tensor, cache: torch.Tensor, group: AttentionGroup,
                            mask: torch.Tensor) -> torch.Tensor:
        """Attention for one group: keys gathered from the cache into a padded [Bg, H, Lmax, d] view (decodes
        in float32 or bfloat16 on CPU: read where they lie, by cpu_kernels' attention kernel)."""
        uniform_heads = self._kv_of_q is None and self.alibi_slopes is None
        if group.one_query_each and uniform_heads and cpu_kernels.attention_applies(q):
            rows = q if group.all_decodes else q.index_select(0, group.token_index)
            out = cpu_kernels.paged_decode_attention(rows, cache[0], cache[1], group.key_blocks, group.context_lens,
                                                     self.block_size, self.softmax_scale or q.shape[-1] ** -0.5)
            return out.view(rows.shape[0], -1)
        keys = self._gather_blocks(cache[0], group.key_blocks)    # [Bg, Hkv, Lmax, d]
        values = self._gather_blocks(cache[1], group.key_blocks)
        scale = self.softmax_scale
        if group.all_decodes and uniform_heads:
            # One query per sequence: the query heads sharing a KV head become that head's query rows
            # ([Bg, Hkv, group, d]), so SDPA reads each gathered key once per KV head, not per query head.
            grouped = q.view(q.shape[0], self.num_kv_heads, -1, q.shape[-1])
            out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask, scale=scale)
            return out.reshape(-1, self.num_q_heads * self.config.head_dim)
        queries = (q.unsqueeze(1) if group.all_decodes else q[group.query_index]).transpose(1, 2)  # [Bg, Hq, Qmax, d]
        if self._kv_of_q is None:
            out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale,
                                                 enable_gqa=self.num_q_heads != self.num_kv_heads)
        else:
            out = F.scaled_dot_product_attention(queries, keys[:, self._kv_of_q], values[:, self._kv_of_q],
                                                 attn_mask=mask, scale=scale)
        out = out.transpose(1, 2).reshape(-1, self.num_q_heads * self.config.head_dim)
        return out if group.all_decodes else out[group.output_index]

    def _gather_blocks(self, cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """[Bg, heads, max_blocks * block_size, d] from a [slots, heads, d] cache: one copy per block."""
        by_block = cache.view(-1, self.block_size, *cache.shape[1:])
        # index_select copies whole blocks (memcpy per block); advanced indexing copies element by element.
        gathered = by_block.index_select(0, blocks.flatten())
        return gathered.view(blocks.shape[0], -1, *cache.shape[1:]).transpose(1, 2)


Getter = Callable[..., torch.Tensor]


def projection(*parts: torch.Tensor) -> Projection:
    """One projection from row blocks stacked in order (q, k, v; gate, up)."""
    return Projection(parts[0] if len(parts) == 1 else torch.cat(parts), pack_for_cpu=True)
