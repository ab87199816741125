"""The model shape every process agrees on, read from a Hugging Face config.json."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


# config.json architectures served here: Llama, Mistral and Mixtral (a mixture of experts in place of
# the MLP) run worker/torch_engine/model.py's decoder; MPT (ALiBi, LayerNorm, GELU) its mpt.py.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM", "MptForCausalLM")
_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM",
                  "mpt": "MptForCausalLM"}


class UnsupportedModel(ValueError):
    """A config.json this stack cannot serve exactly; the message says what, and what is supported."""


def _architecture(raw: dict[str, Any]) -> str:
    """The one supported architecture config.json names; UnsupportedModel for anything else."""
    architectures = raw.get("architectures") or [_BY_MODEL_TYPE.get(raw.get("model_type", ""), "")]
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    for architecture in architectures:
        if architecture not in SUPPORTED_ARCHITECTURES:
            named = architecture or f"model_type {raw.get('model_type')!r}"
            raise UnsupportedModel(f"architecture {named} is not supported (supported: {supported})")
    for flag in ("attention_bias", "mlp_bias"):
        if raw.get(flag):
            raise UnsupportedModel(f"{flag}: true is not supported: the decoders served here have no biases")
    return str(architectures[0])


def _eos_ids(raw: dict[str, Any]) -> tuple[int, ...]:
    eos = raw.get("eos_token_id")
    return tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))


def _folder_eos_ids(model_dir: Path) -> tuple[int, ...]:
    """End-of-sequence ids from generation_config.json, else the tokenizer's eos_token; () if neither says."""
    generation = model_dir / "generation_config.json"
    if generation.exists():
        ids = _eos_ids(json.loads(generation.read_text()))
        if ids:
            return ids
    tokenizer_config, tokenizer_file = model_dir / "tokenizer_config.json", model_dir / "tokenizer.json"
    if tokenizer_config.exists() and tokenizer_file.exists():
        eos = json.loads(tokenizer_config.read_text()).get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str):
            from tokenizers import Tokenizer

            token_id = Tokenizer.from_file(str(tokenizer_file)).token_to_id(eos)
            if token_id is not None:
                return (token_id,)
    return ()


def _mpt_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """MPT's config.json (d_model, n_heads, attn_config, ...) as ModelConfig fields; refuses what MPT here lacks."""
    attn = raw.get("attn_config") or {}
    refusals = {
        "attn_config.alibi: false (learned position embeddings)": not attn.get("alibi", False),
        "no_bias: false (biases)": not raw.get("no_bias", True),
        "attn_config.qk_ln: true": attn.get("qk_ln", False),
        "attn_config.prefix_lm: true": attn.get("prefix_lm", False),
        f"attn_config.attn_type {attn.get('attn_type')!r}": attn.get("attn_type", "multihead_attention")
        != "multihead_attention",
        "logit_scale": raw.get("logit_scale") not in (None, 1, 1.0),
    }
    for what, refused in refusals.items():
        if refused:
            raise UnsupportedModel(f"MPT with {what} is not supported")
    d_model, heads = raw["d_model"], raw["n_heads"]
    return dict(
        vocab_size=raw["vocab_size"], hidden_size=d_model, intermediate_size=int(raw.get("expansion_ratio", 4) * d_model),
        num_hidden_layers=raw["n_layers"], num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=raw.get("max_seq_len", 2048), tie_word_embeddings=True,
        layer_norm_eps=raw.get("layer_norm_epsilon", 1e-5), alibi_bias_max=float(attn.get("alibi_bias_max", 8)),
        clip_qkv=attn.get("clip_qkv"), softmax_scale=attn.get("softmax_scale"),
        bos_token_id=raw.get("bos_token_id"), eos_token_ids=_eos_ids(raw),
    )


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder's shape. Field names follow Hugging Face's LlamaConfig."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    head_dim: int = 0
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    architecture: str = "LlamaForCausalLM"
    # Mixtral: a router picks num_experts_per_tok of num_experts MLPs for each token.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    # MPT: ALiBi instead of rotary positions, LayerNorm without bias, a GELU MLP, optional q/k/v clipping.
    layer_norm_eps: float = 1e-5
    alibi_bias_max: float = 8.0
    clip_qkv: float | None = None
    softmax_scale: float | None = None

    @property
    def uses_alibi(self) -> bool:
        return self.architecture == "MptForCausalLM"

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], name: str) -> ModelConfig:
        """Raises UnsupportedModel for a config this stack would not serve exactly.

        A sliding attention window (Mistral 7B v0.1) caps the context at the window: up to it, full
        attention and windowed attention are the same thing.
        """
        architecture = _architecture(raw)
        if architecture == "MptForCausalLM":
            return cls(name=name, architecture=architecture, **_mpt_fields(raw))
        max_positions = raw.get("max_position_embeddings", 2048)
        if raw.get("sliding_window"):
            max_positions = min(max_positions, int(raw["sliding_window"]))
        rope = raw.get("rope_parameters") or {}
        rope_theta = raw.get("rope_theta", rope.get("rope_theta", 10000.0))
        rope_scaling = raw.get("rope_scaling")
        if rope_scaling is None and rope.get("rope_type", "default") != "default":
            rope_scaling = rope
        return cls(
            name=name,
            architecture=architecture,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=raw["num_attention_heads"],
            num_key_value_heads=raw.get("num_key_value_heads", raw["num_attention_heads"]),
            max_position_embeddings=max_positions,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-5),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            head_dim=raw.get("head_dim") or 0,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=_eos_ids(raw),
            num_experts=raw.get("num_local_experts", 0) if architecture == "MixtralForCausalLM" else 0,
            num_experts_per_tok=raw.get("num_experts_per_tok", 0) if architecture == "MixtralForCausalLM" else 0,
        )

    @classmethod
    def load(cls, model_dir: Path) -> ModelConfig:
        raw = json.loads((model_dir / "config.json").read_text())
        config = cls.from_dict(raw, name=raw.get("_name_or_path") or model_dir.name)
        if not config.eos_token_ids:  # MPT's config.json names none: its generation config or tokenizer does
            config = dataclasses.replace(config, eos_token_ids=_folder_eos_ids(model_dir))
        return config

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json that Hugging Face transformers reads as a LlamaConfig."""
        raw: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "_name_or_path": self.name,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": "float32",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
        }
        if self.rope_scaling:
            raw["rope_scaling"] = self.rope_scaling
        return raw
