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


@pytest.mark.parametrize("architecture", SUPPORTED_ARCHITECTURES)
def test_supported_architectures_load(architecture: str) -> None:
    config = ModelConfig.from_dict({**LLAMA, "architectures": [architecture]}, "m")
    assert config.num_key_value_heads == 2 and config.max_position_embeddings == 8192


def test_a_config_without_architectures_is_known_by_its_model_type() -> None:
    assert ModelConfig.from_dict({**LLAMA, "model_type": "llama"}, "m").hidden_size == 32
    with pytest.raises(UnsupportedModel, match="model_type 'gpt2'"):
        ModelConfig.from_dict({**LLAMA, "model_type": "gpt2"}, "m")


@pytest.mark.parametrize("architecture", ["MixtralForCausalLM", "MptForCausalLM", "Qwen2ForCausalLM"])
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
    folder = tmp_path / "mixtral"
    save_random_model("tiny-gqa", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["MixtralForCausalLM"]}))
    done = subprocess.run([sys.executable, "-m", "services.cli", "serve", "--model", str(folder),
                           "--port", str(free_port())], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "MixtralForCausalLM" in done.stderr and "supported: LlamaForCausalLM" in done.stderr
