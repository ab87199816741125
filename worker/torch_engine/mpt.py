"""MPT (MosaicML): the decoder of model.py with ALiBi in place of rotary positions.

LayerNorm without bias, one fused Wqkv projection (optionally clipped), an exact-GELU MLP, tied
embeddings. ALiBi adds slope_h * (key position - query position) to head h's scores: a bias per
query row that differs from transformers' slope_h * (key position - last position) by a constant,
which softmax does not see. Cached K/V carry no position, so prefix caching and recompute after
preemption need nothing special. Each rank holds its heads' slopes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from inflight.model_config import ModelConfig
from worker.parallel import Collectives, ShardPlan
from worker.torch_engine.mlp import GeluMlp
from worker.torch_engine.model import LayerWeights, LlamaModel, projection
from worker.torch_engine.weights import WeightSource


def alibi_slopes(num_heads: int, bias_max: float) -> torch.Tensor:
    """MPT's per-head slopes: 2^(-bias_max * i / n) over the next power of two n, interleaved when n > heads."""
    padded = 2 ** math.ceil(math.log2(num_heads))
    slopes = 1.0 / torch.pow(2, torch.arange(1, padded + 1, dtype=torch.float32) * (bias_max / padded))
    if padded != num_heads:
        slopes = torch.cat((slopes[1::2], slopes[::2]))[:num_heads]
    return slopes


class MptModel(LlamaModel):
    def __init__(self, config: ModelConfig, weights: WeightSource, shard: ShardPlan,
                 collectives: Collectives, device: torch.device, dtype: torch.dtype, block_size: int = 16) -> None:
        super().__init__(config, weights, shard, collectives, device, dtype, block_size)
        heads = shard.query_heads(config.num_attention_heads)
        slopes = alibi_slopes(config.num_attention_heads, config.alibi_bias_max)[heads.start : heads.stop]
        self.alibi_slopes = slopes.to(device=device, dtype=dtype)
        self.clip_qkv = config.clip_qkv
        self.softmax_scale = config.softmax_scale

    def _load(self, weights: WeightSource, shard: ShardPlan, q_heads: range, kv_heads: range) -> None:
        c, d = self.config, self.config.head_dim
        get = self._get(weights)
        q_rows = range(q_heads.start * d, q_heads.stop * d)
        mlp_rows = shard.rows(c.intermediate_size)

        def wqkv(name: str) -> list[torch.Tensor]:  # q, k and v rows of this rank's heads, from the fused matrix
            return [get(name, range(part * c.hidden_size + q_rows.start, part * c.hidden_size + q_rows.stop))
                    for part in range(3)]

        self.embed_tokens = get("transformer.wte.weight")
        self.lm_head = projection(get("transformer.wte.weight", self.vocab_rows))
        self.norm = get("transformer.norm_f.weight")
        self.layers = []
        for i in range(c.num_hidden_layers):
            p = f"transformer.blocks.{i}."
            self.layers.append(LayerWeights(
                input_norm=get(p + "norm_1.weight"),
                post_attention_norm=get(p + "norm_2.weight"),
                qkv=projection(*wqkv(p + "attn.Wqkv.weight")),
                o=projection(get(p + "attn.out_proj.weight", None, q_rows)),
                mlp=GeluMlp(projection(get(p + "ffn.up_proj.weight", mlp_rows)),
                            projection(get(p + "ffn.down_proj.weight", None, mlp_rows))),
            ))

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, weight.shape, weight, None, self.config.layer_norm_eps)
