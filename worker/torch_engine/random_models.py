"""Named real model shapes with random weights, for benchmarks and tests (no downloads needed)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from inflight.model_config import ModelConfig
from inflight.model_shapes import SHAPES
from worker.torch_engine.weights import RandomWeights


def _weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name the model's loader reads, with its shape, in the family's checkpoint names."""
    if config.architecture == "MptForCausalLM":
        return _mpt_weight_shapes(config)
    hidden, d = config.hidden_size, config.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config.vocab_size, hidden),
        "model.norm.weight": (hidden,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (config.num_attention_heads * d, hidden),
            p + "self_attn.k_proj.weight": (config.num_key_value_heads * d, hidden),
            p + "self_attn.v_proj.weight": (config.num_key_value_heads * d, hidden),
            p + "self_attn.o_proj.weight": (hidden, config.num_attention_heads * d),
        })
        if config.num_experts:
            moe = p + "block_sparse_moe."
            shapes[moe + "gate.weight"] = (config.num_experts, hidden)
            for e in range(config.num_experts):
                shapes.update({
                    f"{moe}experts.{e}.w1.weight": (config.intermediate_size, hidden),
                    f"{moe}experts.{e}.w3.weight": (config.intermediate_size, hidden),
                    f"{moe}experts.{e}.w2.weight": (hidden, config.intermediate_size),
                })
        else:
            shapes.update({
                p + "mlp.gate_proj.weight": (config.intermediate_size, hidden),
                p + "mlp.up_proj.weight": (config.intermediate_size, hidden),
                p + "mlp.down_proj.weight": (hidden, config.intermediate_size),
            })
    return shapes


def _mpt_weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    hidden = config.hidden_size
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.wte.weight": (config.vocab_size, hidden),
        "transformer.norm_f.weight": (hidden,),
    }
    for i in range(config.num_hidden_layers):
        p = f"transformer.blocks.{i}."
        shapes.update({
            p + "norm_1.weight": (hidden,),
            p + "norm_2.weight": (hidden,),
            p + "attn.Wqkv.weight": (3 * hidden, hidden),
            p + "attn.out_proj.weight": (hidden, hidden),
            p + "ffn.up_proj.weight": (config.intermediate_size, hidden),
            p + "ffn.down_proj.weight": (hidden, config.intermediate_size),
        })
    return shapes


def random_model(shape: str, seed: int, device: torch.device, dtype: torch.dtype) -> tuple[ModelConfig, RandomWeights]:
    if shape not in SHAPES:
        raise ValueError(f"unknown random model shape {shape!r}; known: {', '.join(SHAPES)}")
    config = ModelConfig(name=f"random:{shape}", **SHAPES[shape])  # type: ignore[arg-type]
    return config, RandomWeights(_weight_shapes(config), seed, device, dtype)


def save_random_model(shape: str, folder: Path, seed: int = 0, **overrides: object) -> ModelConfig:
    """Write a Hugging Face style folder (config.json, model.safetensors) with random float32 weights."""
    fields = {**SHAPES[shape], **overrides}
    config = ModelConfig(name=f"random-{shape}", **fields)  # type: ignore[arg-type]
    weights = RandomWeights(_weight_shapes(config), seed, torch.device("cpu"), torch.float32)
    tensors = {name: weights.get(name) for name in _weight_shapes(config)}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
    return config
