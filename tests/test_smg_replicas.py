"""Two inflight replicas behind SMG's cache-aware policy: a shared prefix goes where it is cached.

SMG learns where each prefix lives from the replicas' SubscribeKvEvents streams; the second and
later requests of a group (one long shared system prompt, a different question each) must land on
the replica that computed the prompt, which SMG's usage shows as cached prompt tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.smg_router import SmgRouter
from tests.stack import ServedStack

MODEL = "SmolLM2-135M-Instruct"
SYSTEM_PROMPTS = [
    "You are the support assistant of a company that sells bicycles, spare parts and repairs. " * 6,
    "You answer questions about the history of printing, typesetting and early newspapers in Europe. " * 6,
    "You are a patient tutor of elementary arithmetic who explains every step of a calculation. " * 6,
]
QUESTIONS = ["What do you do?", "Give me one fact.", "Say hello."]


@pytest.fixture(scope="module")
def replicas() -> Iterator[list[ServedStack]]:
    served = [ServedStack("--num-kv-blocks", "128", "--max-num-batched-tokens", "512") for _ in range(2)]
    for replica in served:
        replica.wait_ready()
    yield served
    for replica in served:
        assert replica.stop() == 0


@pytest.fixture(scope="module")
def router(replicas: list[ServedStack], model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmgRouter]:
    smg = SmgRouter([r.address for r in replicas], model_dir, tmp_path_factory.mktemp("smg") / "smg.log",
                    policy="cache_aware").wait_ready()
    yield smg
    smg.stop()


def ask(router: SmgRouter, system: str, question: str) -> dict:
    body = {"model": MODEL, "max_tokens": 2, "temperature": 0,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]}
    reply = httpx.post(f"{router.url}/v1/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    return reply.json()["usage"]


@pytest.mark.slow
def test_later_requests_of_a_group_are_routed_to_the_replica_that_cached_its_prefix(replicas, router) -> None:
    for system in SYSTEM_PROMPTS:
        first = ask(router, system, QUESTIONS[0])
        assert first["prompt_tokens"] > 100 and first["prompt_tokens_details"]["cached_tokens"] == 0
        for question in QUESTIONS[1:]:
            usage = ask(router, system, question)
            # Every full block of the shared system prompt is a hit, wherever SMG sent the request.
            assert usage["prompt_tokens_details"]["cached_tokens"] >= 96, usage
    # The replicas' own counters agree: the hits are theirs, not SMG's bookkeeping.
    assert sum(r.stats().prefix_cache_hit_tokens_total for r in replicas) >= 6 * 96
