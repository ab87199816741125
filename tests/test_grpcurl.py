"""End to end with grpcurl, as an operator would drive it: no .proto files, only reflection."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def grpcurl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    return subprocess.run([binary, "-plaintext", *args], capture_output=True, text=True, timeout=timeout)


def parse_stream(stdout: str) -> list[dict]:
    decoder, messages, at = json.JSONDecoder(), [], 0
    while (at := len(stdout) - len(stdout[at:].lstrip()) ) < len(stdout):
        message, at = decoder.raw_decode(stdout, at)
        messages.append(message)
    return messages


@pytest.mark.slow
def test_grpcurl_lists_the_public_services(stack):
    listed = grpcurl(stack.address, "list")
    assert listed.returncode == 0, listed.stderr
    services = set(listed.stdout.split())
    assert {"inflight.v1.Generation", "inflight.v1.Admin", "grpc.health.v1.Health"} <= services
    assert any("reflection" in s for s in services)


@pytest.mark.slow
def test_grpcurl_describes_generate(stack):
    described = grpcurl(stack.address, "describe", "inflight.v1.Generation")
    assert described.returncode == 0, described.stderr
    assert "rpc Generate ( .inflight.v1.GenerateRequest ) returns ( stream .inflight.v1.GenerateResponse )" in described.stdout


@pytest.mark.slow
def test_grpcurl_streams_an_answer_naming_paris(stack):
    body = '{"messages":[{"role":"user","content":"What is the capital of France?"}],"max_tokens":32}'
    result = grpcurl("-d", body, stack.address, "inflight.v1.Generation/Generate")
    assert result.returncode == 0, result.stderr
    messages = parse_stream(result.stdout)
    assert len(messages) > 2  # streamed, not one blob
    assert "Paris" in "".join(m.get("text", "") for m in messages)
    assert messages[-1]["finish_reason"] in ("FINISH_REASON_STOP", "FINISH_REASON_LENGTH")
    assert int(messages[-1]["usage"]["completion_tokens"]) == sum(len(m.get("token_ids", [])) for m in messages)


@pytest.mark.slow
def test_grpcurl_health_and_stats(stack):
    health = grpcurl(stack.address, "grpc.health.v1.Health/Check")
    assert health.returncode == 0 and json.loads(health.stdout)["status"] == "SERVING"
    stats = grpcurl(stack.address, "inflight.v1.Admin/GetStats")
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["kv_blocks_total"] == 255


@pytest.mark.slow
def test_grpcurl_reports_invalid_argument_with_the_field(stack):
    result = grpcurl("-d", '{"prompt":"hi","top_p":1.5}', stack.address, "inflight.v1.Generation/Generate")
    assert result.returncode != 0
    assert "InvalidArgument" in result.stderr and "top_p" in result.stderr


@pytest.mark.slow
def test_inflight_generate_cli_streams_text_and_json(stack):
    command = [sys.executable, "-m", "services.cli", "generate", "--address", stack.address]
    text = subprocess.run([*command, "--chat", "What is the capital of France?", "--max-tokens", "24"],
                          capture_output=True, text=True, timeout=120)
    assert text.returncode == 0, text.stderr
    assert "Paris" in text.stdout
    as_json = subprocess.run([*command, "--json", "--ignore-eos", "--max-tokens", "5", "Once upon a time"],
                             capture_output=True, text=True, timeout=120)
    lines = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert lines[-1]["finish_reason"] == "FINISH_REASON_LENGTH"
    assert sum(len(line.get("token_ids", [])) for line in lines) == 5
    chat = subprocess.run([*command, "--interactive", "--max-tokens", "16"], input="Hello!\nWhat is 2+2?\n\n",
                          capture_output=True, text=True, timeout=120)
    assert chat.returncode == 0, chat.stderr
    assert len([line for line in chat.stdout.splitlines() if line.strip()]) >= 2
