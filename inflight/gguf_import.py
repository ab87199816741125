"""Turn a Llama-family GGUF file into a Hugging Face style model folder.

The folder holds config.json, model.safetensors (float32, dequantized exactly as
transformers dequantizes the same file), tokenizer.json and tokenizer_config.json
(with the chat template), so every process loads it fast with safetensors.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFValueType
from gguf.quants import dequantize
from safetensors.numpy import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from inflight.model_config import ModelConfig

_CONTROL_TOKEN = 3
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def _field(reader: GGUFReader, key: str, default: object = None) -> object:
    field = reader.fields.get(key)
    if field is None:
        return default
    if field.types and field.types[0] == GGUFValueType.ARRAY:
        return list(field.contents())
    return field.contents()


def hf_tensor_name(gguf_name: str) -> str:
    """Map a GGUF tensor name (blk.3.attn_q.weight) to its Hugging Face name."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    match = _LAYER_NAME.fullmatch(gguf_name)
    if match is None or match.group(2) not in _LAYER_TENSORS:
        raise ValueError(f"unsupported GGUF tensor {gguf_name!r}")
    layer, kind, suffix = match.groups()
    return f"model.layers.{layer}.{_LAYER_TENSORS[kind]}.{suffix}"


def undo_rope_permutation(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp interleaves the rotary halves of q/k rows; restore Hugging Face's layout."""
    half = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def read_model_config(reader: GGUFReader, name: str) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported (llama only)")
    heads = int(_field(reader, "llama.attention.head_count"))
    hidden = int(_field(reader, "llama.embedding_length"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    return ModelConfig(
        name=name,
        vocab_size=int(_field(reader, "llama.vocab_size", len(tokens))),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, "llama.feed_forward_length")),
        num_hidden_layers=int(_field(reader, "llama.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(_field(reader, "llama.attention.head_count_kv", heads)),
        max_position_embeddings=int(_field(reader, "llama.context_length")),
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        tie_word_embeddings=not has_output,
        head_dim=int(_field(reader, "llama.rope.dimension_count", hidden // heads)),
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=(int(_field(reader, "tokenizer.ggml.eos_token_id")),),
    )


def build_tokenizer(reader: GGUFReader) -> Tokenizer:
    """A byte-level BPE tokenizer from the GGUF vocabulary and merges."""
    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise ValueError("only byte-level BPE (gpt2-style) GGUF tokenizers are supported")
    tokens: list[str] = _field(reader, "tokenizer.ggml.tokens")  # type: ignore[assignment]
    token_types: list[int] = _field(reader, "tokenizer.ggml.token_type")  # type: ignore[assignment]
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]  # type: ignore[union-attr]
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    specials = [tokens[i] for i, kind in enumerate(token_types) if kind == _CONTROL_TOKEN]
    tokenizer.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tokenizer


def tokenizer_config(reader: GGUFReader) -> dict[str, object]:
    tokens: list[str] = _field(reader, "tokenizer.ggml.tokens")  # type: ignore[assignment]

    def token(key: str) -> str | None:
        index = _field(reader, key)
        return None if index is None else tokens[int(index)]

    return {
        "chat_template": _field(reader, "tokenizer.chat_template"),
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
    }


def dequantized_tensors(reader: GGUFReader, config: ModelConfig) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        weight = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        if ".attn_q." in tensor.name:
            weight = undo_rope_permutation(weight, config.num_attention_heads)
        elif ".attn_k." in tensor.name:
            weight = undo_rope_permutation(weight, config.num_key_value_heads)
        tensors[hf_tensor_name(tensor.name)] = np.ascontiguousarray(weight)
    return tensors


def convert_gguf(gguf_path: Path, out_dir: Path, name: str) -> None:
    """Write the model folder for gguf_path into out_dir (which must exist and be empty)."""
    reader = GGUFReader(str(gguf_path))
    config = read_model_config(reader, name)
    save_file(dequantized_tensors(reader, config), str(out_dir / "model.safetensors"))
    (out_dir / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
    build_tokenizer(reader).save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(reader), indent=2))
