"""The stack's greedy tokens equal transformers' generate on the same GGUF weights (float32)."""

from __future__ import annotations

import pytest
import torch

from inflight.v1 import generation_pb2

NEW_TOKENS = 40
PROMPTS = [
    ("chat", "What is the capital of France?"),
    ("chat", "Write a short poem about the sea and the wind, in four lines."),
    ("raw", "The history of the printing press begins"),
    ("raw", "Once upon a time"),
    ("chat", "Explain, step by step and in detail, how a bicycle gear system lets a rider climb a steep hill "
             "without pedalling harder, and why professional cyclists change gear so often during a race."),
    ("raw", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"),
]


def reference_tokens(hf_reference, kind: str, text: str) -> tuple[list[int], list[int]]:
    tokenizer, model = hf_reference
    if kind == "chat":
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                               tokenize=False)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(text)["input_ids"]
    inputs = torch.tensor([ids])
    with torch.no_grad():
        # eos_token_id=None: keep going past end-of-sequence, as ignore_eos does on our side.
        output = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=NEW_TOKENS,
                                do_sample=False, eos_token_id=None, pad_token_id=0)
    return ids, output[0, len(ids):].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("kind,text", PROMPTS, ids=[f"{k}-{len(t)}" for k, t in PROMPTS])
def test_greedy_tokens_equal_transformers(stack, hf_reference, kind, text):
    prompt_ids, expected = reference_tokens(hf_reference, kind, text)
    request = generation_pb2.GenerateRequest(max_tokens=NEW_TOKENS, ignore_eos=True)
    if kind == "chat":
        request.messages.add(role="user", content=text)
    else:
        request.prompt = text
    completion = stack.client.complete(request, timeout=120)
    assert completion.usage.prompt_tokens == len(prompt_ids)
    assert completion.finish_reason == "FINISH_REASON_LENGTH"
    assert len(completion.token_ids) == NEW_TOKENS
    assert completion.token_ids == expected
