"""The model shape every process agrees on, read from a Hugging Face config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


# config.json architectures served here: each is the Llama decoder of worker/torch_engine/model.py.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}


class UnsupportedModel(ValueError):
    """A config.json this stack cannot serve exactly; the message says what, and what is supported."""


def _check_supported(raw: dict[str, Any]) -> None:
    architectures = raw.get("architectures") or [_BY_MODEL_TYPE.get(raw.get("model_type", ""), "")]
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    for architecture in architectures:
        if architecture not in SUPPORTED_ARCHITECTURES:
            named = architecture or f"model_type {raw.get('model_type')!r}"
            raise UnsupportedModel(f"architecture {named} is not supported (supported: {supported})")
    for flag in ("attention_bias", "mlp_bias"):
        if raw.get(flag):
            raise UnsupportedModel(f"{flag}: true is not supported: the Llama decoder served here has no biases")


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

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], name: str) -> ModelConfig:
        """Raises UnsupportedModel for a config this stack would not serve exactly.

        A sliding attention window (Mistral 7B v0.1) caps the context at the window: up to it, full
        attention and windowed attention are the same thing.
        """
        _check_supported(raw)
        max_positions = raw.get("max_position_embeddings", 2048)
        if raw.get("sliding_window"):
            max_positions = min(max_positions, int(raw["sliding_window"]))
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        rope = raw.get("rope_parameters") or {}
        rope_theta = raw.get("rope_theta", rope.get("rope_theta", 10000.0))
        rope_scaling = raw.get("rope_scaling")
        if rope_scaling is None and rope.get("rope_type", "default") != "default":
            rope_scaling = rope
        return cls(
            name=name,
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
            eos_token_ids=eos_ids,
        )

    @classmethod
    def load(cls, model_dir: Path) -> ModelConfig:
        raw = json.loads((model_dir / "config.json").read_text())
        return cls.from_dict(raw, name=raw.get("_name_or_path") or model_dir.name)

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
