"""The gateway's own behaviour, in process: the real gateway (interceptors, services, its scheduler
client) on loopback, in front of a scripted scheduler that answers over real gRPC."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from inflight.v1 import common_pb2, generation_pb2, generation_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from services.gateway.__main__ import Gateway, start_gateway
from services.gateway.config import GatewayConfig
from tests.stack import free_port

REPLY = "Paris is lovely in the spring."


class ScriptedScheduler(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, reply_ids: list[int], instance_id: str = "first") -> None:
        self.reply_ids = reply_ids
        self.instance_id = instance_id
        self.submits: list[scheduler_pb2.SubmitRequest] = []
        self.aborts: list[tuple[str, str]] = []
        self.release = asyncio.Event()  # Submit streams wait for it before answering
        self.release.set()
        self.submit_failure: tuple[grpc.StatusCode, str] | None = None
        self.stats_failure: tuple[grpc.StatusCode, str] | None = None
        self.sessions = False   # ModelInfo.sessions: the gateway then sends every request on one Session
        self.held_elsewhere = 0  # Session messages count this many requests of other gateways as held

    async def Submit(self, request, context):  # type: ignore[no-untyped-def]
        self.submits.append(request)
        if self.submit_failure:
            await context.abort(*self.submit_failure)
        await self.release.wait()
        for index, token in enumerate(self.reply_ids):
            last = index == len(self.reply_ids) - 1
            yield scheduler_pb2.TokenEvent(token_ids=[token],
                                           finish_reason=common_pb2.FINISH_REASON_LENGTH if last else 0)

    async def Session(self, requests, context):  # type: ignore[no-untyped-def]
        """Each submit: a message at once (what is held now), then its reply in one event once released."""
        outbox: asyncio.Queue[list[scheduler_pb2.SessionEvent]] = asyncio.Queue()
        live: set[str] = set()

        async def answer(submit: scheduler_pb2.SubmitRequest) -> None:
            await self.release.wait()
            live.discard(submit.request_id)
            reply = scheduler_pb2.TokenEvent(token_ids=self.reply_ids, finish_reason=common_pb2.FINISH_REASON_LENGTH)
            outbox.put_nowait([scheduler_pb2.SessionEvent(tenant=submit.tenant, request_id=submit.request_id,
                                                          event=reply)])

        async def read() -> None:
            async for message in requests:
                if message.HasField("submit"):
                    self.submits.append(message.submit)
                    live.add(message.submit.request_id)
                    outbox.put_nowait([])
                    answers.add(asyncio.ensure_future(answer(message.submit)))

        answers: set[asyncio.Future[None]] = set()
        reader = asyncio.ensure_future(read())
        try:
            while True:
                events = await outbox.get()
                yield scheduler_pb2.SessionEvents(events=events, requests_held=len(live) + self.held_elsewhere)
        finally:
            reader.cancel()
            for task in answers:
                task.cancel()

    async def Abort(self, request, context):  # type: ignore[no-untyped-def]
        self.aborts.append((request.tenant, request.request_id))
        return scheduler_pb2.SchedulerAbortResponse(found=True)

    async def GetStats(self, request, context):  # type: ignore[no-untyped-def]
        if self.stats_failure:
            await context.abort(*self.stats_failure)
        return common_pb2.Stats(kv_blocks_total=10, kv_blocks_free=10)

    async def GetModelInfo(self, request, context):  # type: ignore[no-untyped-def]
        return scheduler_pb2.ModelInfo(model_name="scripted", vocab_size=49152, max_model_len=2048, eos_token_ids=[2],
                                       tp_size=1, engine="scripted", device="cpu", instance_id=self.instance_id,
                                       sessions=self.sessions)


async def start_scheduler(scripted: ScriptedScheduler, socket: str) -> grpc.aio.Server:
    server = grpc.aio.server()
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(scripted, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await health_servicer.set("inflight.v1.Scheduler", health_pb2.HealthCheckResponse.SERVING)
    server.add_insecure_port(socket)
    await server.start()
    return server


class Harness:
    def __init__(self, gateway: Gateway, scheduler: ScriptedScheduler, scheduler_server: grpc.aio.Server,
                 socket: str, channel: grpc.aio.Channel) -> None:
        self.gateway, self.scheduler = gateway, scheduler
        self.scheduler_server, self.socket = scheduler_server, socket
        self.generation = generation_pb2_grpc.GenerationStub(channel)
        self.admin = generation_pb2_grpc.AdminStub(channel)

    async def complete(self, text: str = "Hi", tenant: str = "", timeout: float = 10, **fields
                       ) -> generation_pb2.CompleteResponse:
        request = generation_pb2.GenerateRequest(**fields)
        request.messages.add(role="user", content=text)
        return await self.generation.Complete(request, metadata=[("x-tenant-id", tenant)] if tenant else None,
                                              timeout=timeout)

    def count_encodes(self) -> None:
        """From now on, self.encodes counts the gateway's tokenizing of chat requests."""
        self.encodes = 0
        encode_chat = self.gateway.generation.codec.encode_chat

        def counting(*args):  # type: ignore[no-untyped-def]
            self.encodes += 1
            return encode_chat(*args)

        self.gateway.generation.codec.encode_chat = counting  # type: ignore[method-assign]

    def count(self, rpc: str, code: str) -> float:
        return self.gateway.metrics.requests.labels(rpc, code)._value.get()


def run(body: Callable[[Harness], Awaitable[None]], model_dir: Path, tmp_path: Path, sessions: bool = False,
        **limits) -> None:
    async def main() -> None:
        from services.text.codec import TextCodec

        scripted = ScriptedScheduler(TextCodec(model_dir).encode(REPLY))
        scripted.sessions = sessions
        socket = f"unix://{tmp_path}/scheduler.sock"
        scheduler_server = await start_scheduler(scripted, socket)
        config = GatewayConfig(model=str(model_dir), scheduler=socket, host="127.0.0.1", port=free_port(),
                               metrics_port=0, auth_tokens_file="", auth_exempt="", tls_cert="", tls_key="",
                               tls_client_ca="", max_inflight_per_client=limits.get("per_client", 64),
                               drain_seconds=1.0, max_inflight_requests=limits.get("in_flight", 64),
                               max_messages=64, trust_message_special_tokens=False, log_level="info")
        gateway = await start_gateway(config)
        try:
            async with grpc.aio.insecure_channel(gateway.address) as channel:
                for _ in range(200):
                    if gateway.scheduler.ready:
                        break
                    await asyncio.sleep(0.02)
                harness = Harness(gateway, scripted, scheduler_server, socket, channel)
                await body(harness)
        finally:
            await gateway.stop(0.0)
            await harness.scheduler_server.stop(None)

    asyncio.run(main())


def test_admission_is_decided_before_tokenizing_or_calling_the_scheduler(model_dir, tmp_path):
    async def body(h: Harness) -> None:
        h.scheduler.release.clear()
        h.count_encodes()
        held = [asyncio.ensure_future(h.complete(tenant=f"t{i}")) for i in range(4)]
        while len(h.scheduler.submits) < 4:
            await asyncio.sleep(0.01)
        for _ in range(20):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await h.complete(tenant="late")
            assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert h.encodes == 4 and len(h.scheduler.submits) == 4  # the rejected did no work
        h.scheduler.release.set()
        assert all(r.text == REPLY for r in await asyncio.gather(*held))
        assert h.count("Complete", "RESOURCE_EXHAUSTED") == 20

    run(body, model_dir, tmp_path, in_flight=4)


def test_what_the_scheduler_holds_for_other_gateway_processes_counts_against_the_bound(model_dir, tmp_path):
    """Gateway processes sharing a scheduler: each refuses, before any work, once its own requests and what the
    scheduler's latest session message says it holds for the others reach the bound; an old figure is dropped."""
    async def body(h: Harness) -> None:
        h.scheduler.release.clear()
        h.scheduler.held_elsewhere = 3
        h.count_encodes()
        first = asyncio.ensure_future(h.complete(tenant="a"))
        while h.gateway.scheduler.held_elsewhere() != 3:
            await asyncio.sleep(0.01)
        for _ in range(5):  # 1 here + 3 elsewhere = the bound of 4
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await h.complete(tenant="late")
            assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert h.encodes == 1 and len(h.scheduler.submits) == 1  # the refused did no work
        await asyncio.sleep(0.6)  # no message since: the others' requests may have ended, the figure is dropped
        second = asyncio.ensure_future(h.complete(tenant="b"))
        while len(h.scheduler.submits) < 2:
            await asyncio.sleep(0.01)
        h.scheduler.release.set()
        assert [r.text for r in await asyncio.gather(first, second)] == [REPLY, REPLY]
        assert h.count("Complete", "RESOURCE_EXHAUSTED") == 5

    run(body, model_dir, tmp_path, sessions=True, in_flight=4)


def test_request_ids_are_scoped_by_tenant(model_dir, tmp_path):
    async def body(h: Harness) -> None:
        h.scheduler.release.clear()
        a = asyncio.ensure_future(h.complete(tenant="a", request_id="same"))
        b = asyncio.ensure_future(h.complete(tenant="b", request_id="same"))
        while len(h.scheduler.submits) < 2:
            await asyncio.sleep(0.01)
        assert sorted((s.tenant, s.request_id) for s in h.scheduler.submits) == [("a", "same"), ("b", "same")]
        with pytest.raises(grpc.aio.AioRpcError) as raised:  # a's own id, still in flight
            await h.complete(tenant="a", request_id="same")
        assert raised.value.code() == grpc.StatusCode.ALREADY_EXISTS
        found = await h.generation.Abort(generation_pb2.AbortRequest(request_id="same"), metadata=[("x-tenant-id", "c")])
        assert not found.found and h.scheduler.aborts == []  # c cannot reach a's or b's request
        await h.generation.Abort(generation_pb2.AbortRequest(request_id="same"), metadata=[("x-tenant-id", "b")])
        assert h.scheduler.aborts == [("b", "same")]
        h.scheduler.release.set()
        await asyncio.gather(a, b)

    run(body, model_dir, tmp_path)


def test_internal_failures_reach_clients_as_a_generic_message_with_the_request_id(model_dir, tmp_path):
    async def body(h: Harness) -> None:
        h.scheduler.submit_failure = (grpc.StatusCode.INTERNAL, "Traceback: KeyError('secret internals')")
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await h.complete(request_id="req-7")
        assert raised.value.code() == grpc.StatusCode.INTERNAL
        assert "req-7" in raised.value.details() and "secret" not in raised.value.details()
        h.scheduler.submit_failure = (grpc.StatusCode.UNAVAILABLE, "unix:/tmp/inflight-x/worker.sock: refused")
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await h.complete(request_id="req-8")
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE and "sock" not in raised.value.details()

    run(body, model_dir, tmp_path)


def test_every_rpc_is_counted_by_its_final_code_and_a_deadline_is_not_a_cancel(model_dir, tmp_path):
    async def body(h: Harness) -> None:
        await h.generation.Tokenize(generation_pb2.TokenizeRequest(prompt="hello"))
        with pytest.raises(grpc.aio.AioRpcError):
            await h.generation.Detokenize(generation_pb2.DetokenizeRequest(token_ids=[10**7]))
        await h.generation.ModelInfo(generation_pb2.ModelInfoRequest())
        await h.generation.Abort(generation_pb2.AbortRequest(request_id="nothing"))
        await h.admin.GetStats(common_pb2.GetStatsRequest())
        h.scheduler.release.clear()
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await h.complete(timeout=0.5)
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await asyncio.sleep(0.3)  # the server sees the deadline pass too
        expected = {("Tokenize", "OK"): 1, ("Detokenize", "INVALID_ARGUMENT"): 1, ("ModelInfo", "OK"): 1,
                    ("Abort", "OK"): 1, ("GetStats", "OK"): 1, ("Complete", "DEADLINE_EXCEEDED"): 1,
                    ("Complete", "CANCELLED"): 0}
        assert {key: h.count(*key) for key in expected} == expected

    run(body, model_dir, tmp_path)


def test_stats_are_unavailable_when_the_scheduler_cannot_know_them(model_dir, tmp_path):
    async def body(h: Harness) -> None:
        h.scheduler.stats_failure = (grpc.StatusCode.UNAVAILABLE, "the worker group is not ready")
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await h.admin.GetStats(common_pb2.GetStatsRequest())
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE

    run(body, model_dir, tmp_path)


def test_a_flood_of_empty_messages_is_refused_before_templating(model_dir, tmp_path):
    async def body(h: Harness) -> None:
        request = generation_pb2.GenerateRequest()
        request.messages.extend([generation_pb2.ChatMessage()] * 300_000)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await h.generation.Complete(request, timeout=10)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert raised.value.details().startswith("messages: at most 64 messages")
        assert h.scheduler.submits == []

    run(body, model_dir, tmp_path)


def test_a_restarted_scheduler_is_found_again_and_counted(model_dir, tmp_path):
    async def body(h: Harness) -> None:
        assert (await h.complete()).text == REPLY
        await h.scheduler_server.stop(None)
        h.scheduler = ScriptedScheduler(h.scheduler.reply_ids, instance_id="second")
        h.scheduler_server = await start_scheduler(h.scheduler, h.socket)
        for _ in range(300):
            if h.gateway.scheduler.ready and h.gateway.scheduler.restarts == 1:
                break
            await asyncio.sleep(0.02)
        assert (await h.complete()).text == REPLY
        assert (await h.admin.GetStats(common_pb2.GetStatsRequest())).scheduler_restarts == 1

    run(body, model_dir, tmp_path)


def test_a_burst_past_grpcs_pending_queue_is_refused_with_resource_exhausted_never_cancelled(model_dir, tmp_path):
    """gRPC's core drops calls beyond 1,000 waiting to be picked up with a bare CANCELLED, unless told not to."""
    async def body(h: Harness) -> None:
        h.scheduler.release.clear()
        held = [asyncio.ensure_future(h.complete(tenant=f"t{i}")) for i in range(2)]
        while len(h.scheduler.submits) < 2:
            await asyncio.sleep(0.01)
        channels = [grpc.aio.insecure_channel(h.gateway.address) for _ in range(4)]
        stubs = [generation_pb2_grpc.GenerationStub(c) for c in channels]
        request = generation_pb2.GenerateRequest(max_tokens=4)
        request.messages.add(role="user", content="Hi")

        async def one(index: int) -> grpc.StatusCode:
            try:
                await stubs[index % 4].Complete(request, metadata=[("x-tenant-id", f"burst-{index % 50}")], timeout=120)
                return grpc.StatusCode.OK
            except grpc.aio.AioRpcError as error:
                return error.code()

        codes = await asyncio.gather(*[one(i) for i in range(3000)])
        for channel in channels:
            await channel.close()
        assert set(codes) == {grpc.StatusCode.RESOURCE_EXHAUSTED}, {c: codes.count(c) for c in set(codes)}
        h.scheduler.release.set()
        await asyncio.gather(*held)

    run(body, model_dir, tmp_path, in_flight=2)
