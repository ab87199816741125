"""Tiny checkpoints with SmolLM2's tokenizer beside them (their vocabulary is SmolLM2's size).

MPT and Mixtral, for tests of the model families, are built with transformers' own config classes and
`save_pretrained`; a Llama of random:tiny-gqa's shape is written by the engine's own random-model writer. The weights are scaled up from transformers' small
initialisation so that greedy tokens vary from step to step: a model that repeats one token proves
nothing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

WEIGHT_SCALE = 4.0
VOCAB_SIZE = 49152


def _scaled(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" not in name:
                parameter.mul_(WEIGHT_SCALE)
    return model.eval()


def save_tiny(family: str, folder: Path, tokenizer_from: Path, seed: int = 0) -> Path:
    """Write a 2-layer, 4-head `family` ("mpt" or "mixtral") checkpoint into folder; returns folder."""
    from transformers import MixtralConfig, MixtralForCausalLM, MptConfig, MptForCausalLM

    torch.manual_seed(seed)
    model: torch.nn.Module
    if family == "mpt":
        # clip_qkv bites: with the scaled weights some q/k/v values pass 2.
        model = MptForCausalLM(MptConfig(vocab_size=VOCAB_SIZE, d_model=64, n_heads=4, n_layers=2, max_seq_len=1024,
                                         attn_config={"clip_qkv": 2.0}))
    elif family == "mixtral":
        # 4 heads over 2 KV heads, 4 experts of which each token takes 2: at tp=2 each rank has one KV
        # head and half of every expert.
        model = MixtralForCausalLM(MixtralConfig(
            vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=1024))
    else:
        raise ValueError(family)
    _scaled(model).save_pretrained(folder)
    return _with_tokenizer(folder, tokenizer_from)


def save_tiny_gqa(folder: Path, tokenizer_from: Path) -> Path:
    """A 2-layer Llama with 8 heads and 2 KV heads (replicated at tp=4), random weights; returns folder."""
    from worker.torch_engine.random_models import save_random_model

    save_random_model("tiny-gqa", folder, seed=7, vocab_size=VOCAB_SIZE, eos_token_ids=(2,))
    return _with_tokenizer(folder, tokenizer_from)


def _with_tokenizer(folder: Path, tokenizer_from: Path) -> Path:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_from / name, folder / name)
    return folder


def load_reference(folder: Path) -> torch.nn.Module:
    """transformers' own model from the folder, float32."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def reference_greedy(model: torch.nn.Module, prompt_ids: list[int], new_tokens: int) -> list[int]:
    inputs = torch.tensor([prompt_ids])
    with torch.no_grad():
        output = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=new_tokens,
                                do_sample=False, eos_token_id=None, pad_token_id=0)
    return output[0, len(prompt_ids):].tolist()
