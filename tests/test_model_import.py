"""The GGUF import gives transformers' weights, tokenizer and chat template exactly."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from services.text.codec import Message, TextCodec

TEXTS = [
    "Hello 12345 world <|im_start|>user\nhi<|im_end|>",
    "  multiple   spaces\n\n\ttabs and trailing  ",
    "ünïcödé 日本語 emoji 🎉 and <file_sep>code",
    "def f(x):\n    return x**2  # square",
]


def test_imported_weights_equal_transformers_dequantization(model_dir, hf_reference):
    _, model = hf_reference
    ours = load_file(str(model_dir / "model.safetensors"))
    theirs = model.state_dict()
    assert set(ours) <= set(theirs)
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name


def test_tokenizer_matches_transformers(model_dir, hf_reference):
    tokenizer, _ = hf_reference
    codec = TextCodec(model_dir)
    for text in TEXTS:
        assert codec.encode(text) == tokenizer(text)["input_ids"], text
        assert codec.tokenizer.decode(codec.encode(text), skip_special_tokens=False) == text


def test_chat_template_matches_transformers(model_dir, hf_reference):
    tokenizer, _ = hf_reference
    codec = TextCodec(model_dir)
    conversations = [
        [Message("user", "What is the capital of France?")],
        [Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello!"), Message("user", "Bye")],
    ]
    for messages in conversations:
        as_dicts = [{"role": m.role, "content": m.content} for m in messages]
        expected = tokenizer.apply_chat_template(as_dicts, add_generation_prompt=True, tokenize=False)
        assert codec.render_chat(messages) == expected
        expected_ids = tokenizer(expected, add_special_tokens=False)["input_ids"]
        assert codec.encode_chat(messages) == expected_ids
