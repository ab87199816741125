"""Shared fixtures: the prepared embedded model, a running stack, the transformers reference."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from inflight.model_store import embedded_gguf_path, resolve_model
from tests.stack import ServedStack

# A small cache (256 blocks of 16 tokens) keeps the suite's memory low and is plenty for it.
STACK_ARGS = ("--num-kv-blocks", "256", "--max-num-batched-tokens", "512")


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return resolve_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def stack(model_dir: Path) -> Iterator[ServedStack]:
    served = ServedStack(*STACK_ARGS).wait_ready()
    yield served
    assert served.stop() == 0, served.log_tail()


@pytest.fixture(scope="session")
def hf_reference():
    """transformers' own loading of the same GGUF file, dequantized to float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.eval()
    return tokenizer, model
