"""SMG (the Shepherd Model Gateway, `smg` from PyPI) fronting one inflight replica as a TensorRT-LLM gRPC worker.

Offline on loopback: SMG reads SmolLM2's tokenizer from the local folder, finds our
`trtllm.TrtllmService` on the gateway's port, and serves OpenAI's HTTP API over it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from inflight.v1 import generation_pb2
from tests.smg_router import SmgRouter

MODEL = "SmolLM2-135M-Instruct"
QUESTION = "What is the capital of France?"
PROMPT = "The history of the printing press begins"


@pytest.fixture(scope="module")
def smg(stack, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:  # noqa: ANN001
    router = SmgRouter([stack.address], model_dir, tmp_path_factory.mktemp("smg") / "smg.log").wait_ready()
    yield router.url
    router.stop()


def ours(stack, chat: bool, max_tokens: int) -> str:  # noqa: ANN001
    request = generation_pb2.GenerateRequest(max_tokens=max_tokens)
    if chat:
        request.messages.add(role="user", content=QUESTION)
    else:
        request.prompt = PROMPT
    return stack.client.complete(request, timeout=120).text


@pytest.mark.slow
def test_smg_registers_the_replica_as_a_tensorrt_llm_grpc_worker(smg: str, stack) -> None:  # noqa: ANN001
    (worker,) = httpx.get(f"{smg}/workers", timeout=10).json()["workers"]
    assert (worker["runtime_type"], worker["connection_mode"]) == ("trtllm", "grpc")
    assert worker["is_healthy"] and worker["model_id"] == MODEL and worker["labels"]["tp_size"] == "1"


@pytest.mark.slow
def test_completions_and_chat_completions_answer_with_our_greedy_text(smg: str, stack) -> None:  # noqa: ANN001
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 16, "temperature": 0}
    completion = httpx.post(f"{smg}/v1/completions", json=body, timeout=120).json()
    assert completion["choices"][0]["text"] == ours(stack, chat=False, max_tokens=16)
    chat = {"model": MODEL, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 24, "temperature": 0}
    answer = httpx.post(f"{smg}/v1/chat/completions", json=chat, timeout=120).json()
    expected = ours(stack, chat=True, max_tokens=24)
    assert answer["choices"][0]["message"]["content"] == expected
    pieces = []
    with httpx.stream("POST", f"{smg}/v1/chat/completions", json={**chat, "stream": True}, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choices = json.loads(line[len("data: "):]).get("choices") or [{}]
                pieces.append(choices[0].get("delta", {}).get("content") or "")
    assert "".join(pieces) == expected


@pytest.mark.slow
def test_a_client_that_disconnects_mid_stream_makes_smg_abort_and_every_block_is_freed(smg: str, stack) -> None:  # noqa: ANN001
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 3000, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"{smg}/v1/completions", json=body, timeout=120) as response:
        for index, _ in enumerate(response.iter_lines()):
            if index >= 6:
                break  # hang up with ~2,990 tokens to go
    began = time.monotonic()
    idle = stack.wait_idle(timeout=30)
    # 3,000 tokens take well over a minute here: an idle stack within 30 s means the request was aborted.
    assert idle.kv_blocks_free == idle.kv_blocks_total and idle.requests_running == 0
    assert time.monotonic() - began < 30
    assert ours(stack, chat=False, max_tokens=4)


@pytest.mark.slow
def test_smg_without_a_tokenizer_of_its_own_fetches_ours_and_answers_the_same(stack, tmp_path: Path) -> None:  # noqa: ANN001
    router = SmgRouter([stack.address], None, tmp_path / "smg.log").wait_ready()
    try:
        chat = {"model": MODEL, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 24, "temperature": 0}
        answer = httpx.post(f"{router.url}/v1/chat/completions", json=chat, timeout=120).json()
        assert answer["choices"][0]["message"]["content"] == ours(stack, chat=True, max_tokens=24)
        assert "Fetching tokenizer from worker" in (tmp_path / "smg.log").read_text(errors="replace")
    finally:
        router.stop()
