"""The scheduler's Session RPC: many requests on one stream, each step's events for all of them in one message.

The real engine loop and SchedulerService on loopback gRPC, in front of the scripted worker of
tests/test_engine_loop.py (one token per sampled sequence, at once).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from inflight import sampling
from inflight.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from scheduler.service import SchedulerService
from services.gateway.scheduler_session import SchedulerSession, SessionBroken
from tests.test_engine_loop import EXPECTED, Answer, Harness, honest, run_with


def submit(request_id: str, max_new_tokens: int = 6, prompt: tuple[int, ...] = (5, 6, 7, 8, 9)
           ) -> scheduler_pb2.SessionRequest:
    return scheduler_pb2.SessionRequest(submit=scheduler_pb2.SubmitRequest(
        request_id=request_id, prompt_token_ids=prompt, max_new_tokens=max_new_tokens,
        sampling=sampling.resolved(seed=1), ignore_eos=True))


async def paced(plan, context):  # type: ignore[no-untyped-def]
    """honest, 20 ms a step: long requests stay running while a test acts on them."""
    await asyncio.sleep(0.02)
    return await honest(plan, context)


def with_session(body, tmp_path: Path, answer: Answer = honest) -> None:  # type: ignore[no-untyped-def]
    """body(harness, session stub) with the scheduler's service served on a unix socket."""
    async def served(h: Harness) -> None:
        server = grpc.aio.server()
        scheduler_pb2_grpc.add_SchedulerServicer_to_server(SchedulerService(h.loop), server)
        address = f"unix://{tmp_path}/scheduler.sock"
        server.add_insecure_port(address)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                await body(h, scheduler_pb2_grpc.SchedulerStub(channel))
        finally:
            await server.stop(None)

    run_with(answer, served, tmp_path)


@dataclass
class Received:
    tokens: dict[str, list[int]] = field(default_factory=dict)
    finished: dict[str, int] = field(default_factory=dict)                # request id -> finish reason
    statuses: dict[str, tuple[int, str]] = field(default_factory=dict)   # request id -> status code, message
    messages: int = 0


async def receive(call: grpc.aio.StreamStreamCall, requests: int) -> Received:
    """Read the session until that many requests have ended (with a finish reason, or a status)."""
    received = Received()
    while len(received.finished) + len(received.statuses) < requests:
        batch = await asyncio.wait_for(call.read(), 10)
        received.messages += 1
        for event in batch.events:
            if event.status_code:
                received.statuses[event.request_id] = (event.status_code, event.status_message)
                continue
            received.tokens.setdefault(event.request_id, []).extend(event.event.token_ids)
            if event.event.finish_reason:
                received.finished[event.request_id] = event.event.finish_reason
    return received


async def until(condition, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    for _ in range(int(timeout / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise TimeoutError("the condition never held")


def test_requests_on_one_session_get_their_tokens_and_share_messages(tmp_path):
    async def body(h: Harness, stub: scheduler_pb2_grpc.SchedulerStub) -> None:
        call = stub.Session()
        for name in ("a", "b", "c", "d"):
            await call.write(submit(name))
        received = await receive(call, 4)
        assert received.tokens == {name: EXPECTED for name in "abcd"} and not received.statuses
        assert set(received.finished.values()) == {common_pb2.FINISH_REASON_LENGTH}
        assert received.messages < 4 * len(EXPECTED)  # a step's tokens for several requests travel together
        call.cancel()
        await until(h.all_blocks_free)

    with_session(body, tmp_path)


def test_an_abort_on_the_session_ends_that_request_alone(tmp_path):
    async def body(h: Harness, stub: scheduler_pb2_grpc.SchedulerStub) -> None:
        call = stub.Session()
        await call.write(submit("long", max_new_tokens=60))
        await call.write(submit("short"))
        await call.write(scheduler_pb2.SessionRequest(abort=scheduler_pb2.SchedulerAbortRequest(request_id="long")))
        received = await receive(call, 2)
        assert received.finished == {"long": common_pb2.FINISH_REASON_ABORT, "short": common_pb2.FINISH_REASON_LENGTH}
        assert received.tokens["short"] == EXPECTED
        call.cancel()
        await until(h.all_blocks_free)

    with_session(body, tmp_path)


def test_a_rejected_submit_is_a_status_for_that_request_and_the_session_serves_on(tmp_path):
    async def body(h: Harness, stub: scheduler_pb2_grpc.SchedulerStub) -> None:
        call = stub.Session()
        await call.write(submit("empty", prompt=()))
        await call.write(submit("fine"))
        received = await receive(call, 2)
        code, message = received.statuses["empty"]
        assert code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "prompt_token_ids" in message
        assert received.tokens == {"fine": EXPECTED} and received.finished == {"fine": common_pb2.FINISH_REASON_LENGTH}
        call.cancel()

    with_session(body, tmp_path)


def test_sampling_left_at_proto3_zeros_is_refused_not_read_as_defaults(tmp_path):
    """The gateway resolves every default (inflight.sampling); a top_p or repetition penalty of 0 is a
    caller's mistake, named in the status, and the session serves on."""
    async def body(h: Harness, stub: scheduler_pb2_grpc.SchedulerStub) -> None:
        call = stub.Session()
        unresolved = submit("unresolved")
        unresolved.submit.sampling.CopyFrom(common_pb2.SamplingParams(seed=1))
        no_penalty = submit("no-penalty")
        no_penalty.submit.sampling.repetition_penalty = 0.0
        for request in (unresolved, no_penalty, submit("fine")):
            await call.write(request)
        received = await receive(call, 3)
        assert received.statuses["unresolved"] == (grpc.StatusCode.INVALID_ARGUMENT.value[0],
                                                   "sampling.top_p: must lie in (0, 1]")
        assert received.statuses["no-penalty"] == (grpc.StatusCode.INVALID_ARGUMENT.value[0],
                                                   "sampling.repetition_penalty: must lie in (0, 10]")
        assert received.tokens == {"fine": EXPECTED}
        call.cancel()

    with_session(body, tmp_path)


def test_requests_still_running_when_the_session_goes_away_are_aborted(tmp_path):
    async def body(h: Harness, stub: scheduler_pb2_grpc.SchedulerStub) -> None:
        call = stub.Session()
        for name in ("x", "y", "z"):
            await call.write(submit(name, max_new_tokens=100))  # 2 s each at 20 ms a step
        await asyncio.wait_for(call.read(), 10)  # all are running
        call.cancel()  # the gateway went away
        assert h.loop.planner is not None  # every one aborted at once, none left to run to its end
        await until(lambda: not h.loop.planner.requests and h.all_blocks_free(), timeout=1.0)
        assert h.loop.streams == {}

    with_session(body, tmp_path, answer=paced)


def test_clients_that_go_away_mid_submit_end_their_own_requests_and_no_other(tmp_path):
    """The gateway's side: a request handler cancelled while its submit is being written (its client went
    away) must not cancel the shared stream; its request is aborted, and the others keep their tokens."""
    async def body(h: Harness, stub: scheduler_pb2_grpc.SchedulerStub) -> None:
        session = SchedulerSession(stub)
        bystander = await session.submit(submit("bystander", max_new_tokens=40).submit)
        for attempt in range(48):
            leaving = asyncio.get_running_loop().create_task(session.submit(submit(f"gone-{attempt}", 100).submit))
            for _ in range(attempt % 8):  # cancel at each point of the submit: before, during, after the write
                await asyncio.sleep(0)
            leaving.cancel()
            await asyncio.gather(leaving, return_exceptions=True)
            if leaving.cancelled():
                continue
            session.abort("", f"gone-{attempt}")  # the submit finished first: its handler's own cleanup
        tokens: list[int] = []
        while True:
            item = await asyncio.wait_for(bystander.get(), 10)
            assert not isinstance(item, SessionBroken), item
            tokens += item.event.token_ids
            if item.event.finish_reason:
                break
        assert item.event.finish_reason == common_pb2.FINISH_REASON_LENGTH and len(tokens) == 40
        assert h.loop.planner is not None  # and none of the 48 was left to run its 100 tokens (2 s)
        await until(lambda: not h.loop.planner.requests and h.all_blocks_free(), timeout=1.5)
        await session.close()

    with_session(body, tmp_path, answer=paced)


def test_each_session_learns_what_the_scheduler_holds_for_the_other_sessions(tmp_path):
    """Two gateway processes' sessions on one scheduler: each message says how many requests it holds in all,
    and each gateway's session takes its own away (held_elsewhere). With no fresh message the figure is 0."""
    async def body(h: Harness, stub: scheduler_pb2_grpc.SchedulerStub) -> None:
        first, second = SchedulerSession(stub), SchedulerSession(stub)
        theirs = [await first.submit(submit(f"a{i}", max_new_tokens=100).submit) for i in range(3)]
        mine = await second.submit(submit("b", max_new_tokens=100).submit)
        await until(lambda: second.held_elsewhere() == 3 and first.held_elsewhere() == 1)
        for i in range(3):
            first.abort("", f"a{i}")
        await until(lambda: second.held_elsewhere() == 0 and h.loop.requests_held() == 1)
        assert all(queue.empty() or not isinstance(queue.get_nowait(), SessionBroken) for queue in theirs)
        second.abort("", "b")
        await until(lambda: h.loop.requests_held() == 0)
        await asyncio.sleep(0.6)  # no session has events now: a figure this old counts for nothing
        assert first.held_elsewhere() == second.held_elsewhere() == 0
        assert mine.qsize() > 0  # b had streamed tokens
        await first.close()
        await second.close()

    with_session(body, tmp_path, answer=paced)
