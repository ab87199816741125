"""Which config.json architectures the stack serves, and a clear refusal of the others at start-up."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from inflight.model_config import SUPPORTED_ARCHITECTURES, ModelConfig, UnsupportedModel
from tests.stack import REPO, free_port
from worker.torch_engine.random_models import save_random_model

LLAMA = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 8192}


MPT = {"vocab_size": 64, "d_model": 32, "n_heads": 4, "n_layers": 2, "max_seq_len": 2048, "expansion_ratio": 4,
       "no_bias": True, "attn_config": {"alibi": True, "alibi_bias_max": 8, "clip_qkv": None}}


@pytest.mark.parametrize("architecture", [a for a in SUPPORTED_ARCHITECTURES if a != "MptForCausalLM"])
def test_llama_family_architectures_load(architecture: str) -> None:
    raw = {**LLAMA, "architectures": [architecture], "num_local_experts": 8, "num_experts_per_tok": 2}
    config = ModelConfig.from_dict(raw, "m")
    assert config.architecture == architecture
    assert config.num_key_value_heads == 2 and config.max_position_embeddings == 8192
    experts = (8, 2) if architecture == "MixtralForCausalLM" else (0, 0)
    assert (config.num_experts, config.num_experts_per_tok) == experts


def test_mpt_config_is_read_in_its_own_names() -> None:
    config = ModelConfig.from_dict({**MPT, "architectures": ["MptForCausalLM"]}, "m")
    assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers) == (32, 4, 2)
    assert config.num_key_value_heads == 4 and config.intermediate_size == 128 and config.tie_word_embeddings
    assert config.uses_alibi and config.max_position_embeddings == 2048


@pytest.mark.parametrize("change,named", [
    ({"attn_config": {"alibi": False}}, "alibi"), ({"no_bias": False}, "no_bias"),
    ({"attn_config": {"alibi": True, "qk_ln": True}}, "qk_ln"), ({"logit_scale": 0.5}, "logit_scale"),
])
def test_mpt_variants_served_differently_are_refused_by_name(change: dict, named: str) -> None:
    with pytest.raises(UnsupportedModel, match=named):
        ModelConfig.from_dict({**MPT, **change, "architectures": ["MptForCausalLM"]}, "m")


def test_a_config_without_architectures_is_known_by_its_model_type() -> None:
    assert ModelConfig.from_dict({**LLAMA, "model_type": "llama"}, "m").hidden_size == 32
    with pytest.raises(UnsupportedModel, match="model_type 'gpt2'"):
        ModelConfig.from_dict({**LLAMA, "model_type": "gpt2"}, "m")


@pytest.mark.parametrize("architecture", ["Qwen2ForCausalLM", "GPT2LMHeadModel", "FalconForCausalLM"])
def test_other_architectures_are_refused_by_name(architecture: str) -> None:
    with pytest.raises(UnsupportedModel) as refused:
        ModelConfig.from_dict({**LLAMA, "architectures": [architecture]}, "m")
    assert architecture in str(refused.value) and "LlamaForCausalLM" in str(refused.value)


def test_biases_the_decoder_does_not_have_are_refused() -> None:
    with pytest.raises(UnsupportedModel, match="attention_bias"):
        ModelConfig.from_dict({**LLAMA, "architectures": ["LlamaForCausalLM"], "attention_bias": True}, "m")


def test_a_sliding_window_caps_the_context() -> None:
    raw = {**LLAMA, "architectures": ["MistralForCausalLM"], "sliding_window": 4096}
    assert ModelConfig.from_dict(raw, "m").max_position_embeddings == 4096
    assert ModelConfig.from_dict({**raw, "sliding_window": None}, "m").max_position_embeddings == 8192


def test_serve_refuses_an_unsupported_folder_at_once_naming_the_architecture(tmp_path: Path) -> None:
    folder = tmp_path / "qwen2"
    save_random_model("tiny-gqa", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["Qwen2ForCausalLM"]}))
    done = subprocess.run([sys.executable, "-m", "services.cli", "serve", "--model", str(folder),
                           "--port", str(free_port())], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "Qwen2ForCausalLM" in done.stderr and "supported: LlamaForCausalLM" in done.stderr
