"""What an operator relies on: auth, TLS and mTLS, metrics, overload limits, graceful shutdown."""

from __future__ import annotations

import signal
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2

from inflight.v1 import common_pb2, generation_pb2
from tests.certificates import make_pki
from tests.stack import ServedStack, free_port, health_status, scrape_metrics

G = generation_pb2.GenerateRequest
SMALL = ("--num-kv-blocks", "64", "--max-num-batched-tokens", "256")


def chat(text: str = "What is the capital of France?", **fields) -> generation_pb2.GenerateRequest:
    request = G(**fields)
    request.messages.add(role="user", content=text)
    return request


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def secure_stack(pki, tmp_path_factory):
    """TLS, bearer tokens and metrics together, as a platform team would run it."""
    tokens = tmp_path_factory.mktemp("auth") / "tokens.txt"
    tokens.write_text("# token tenant [admin]\nuser-token team-a\nops-token ops admin\n")
    metrics_port = free_port()
    served = ServedStack(*SMALL, "--auth-tokens-file", str(tokens), "--tls-cert", str(pki["server"].cert),
                         "--tls-key", str(pki["server"].key), "--metrics-port", str(metrics_port),
                         tls={"root": pki["ca"].cert.read_bytes()}, token="user-token").wait_ready()
    served.metrics_port = metrics_port
    yield served
    assert served.stop() == 0


@pytest.mark.slow
def test_missing_or_wrong_token_is_unauthenticated(secure_stack):
    for token in (None, "wrong-token"):
        client = secure_stack.make_client(token=token)
        with pytest.raises(grpc.RpcError) as raised:
            client.complete(chat(max_tokens=2), timeout=30)
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        client.close()


@pytest.mark.slow
def test_a_valid_token_generates_and_only_admin_tokens_read_stats(secure_stack):
    assert "Paris" in secure_stack.client.complete(chat(max_tokens=16), timeout=60).text
    with pytest.raises(grpc.RpcError) as raised:
        secure_stack.client.stats()
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    ops = secure_stack.make_client(token="ops-token")
    assert ops.stats().kv_blocks_total == 63
    ops.close()


@pytest.mark.slow
def test_only_admin_tokens_subscribe_to_kv_events_which_carry_every_tenants_prompts(secure_stack):
    from smg_grpc_proto.generated import common_pb2 as smg_common
    from smg_grpc_proto.generated import trtllm_service_pb2_grpc

    for token, allowed in (("user-token", False), ("ops-token", True)):
        client = secure_stack.make_client(token=token)
        call = trtllm_service_pb2_grpc.TrtllmServiceStub(client.channel).SubscribeKvEvents(
            smg_common.SubscribeKvEventsRequest(), metadata=client.metadata, timeout=5)
        batches = []
        with pytest.raises(grpc.RpcError) as ended:
            batches.extend(call)
        expected = grpc.StatusCode.DEADLINE_EXCEEDED if allowed else grpc.StatusCode.PERMISSION_DENIED
        assert ended.value.code() == expected
        # The admin's stream opens on the scheduler's history: the stack's first batch clears the cache.
        assert bool(batches) is allowed and (not allowed or batches[0].events[0].HasField("cleared"))
        client.close()


@pytest.mark.slow
def test_health_needs_no_token_but_plaintext_is_refused(secure_stack):
    assert health_status(secure_stack.port, credentials=secure_stack.credentials()) == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError):
        health_status(secure_stack.port)  # a plaintext client cannot talk to a TLS port


@pytest.mark.slow
def test_metrics_count_the_traffic(secure_stack):
    before = scrape_metrics(secure_stack.metrics_port)
    results = [secure_stack.client.complete(chat(max_tokens=8, ignore_eos=True), timeout=60) for _ in range(3)]
    with pytest.raises(grpc.RpcError):
        secure_stack.client.complete(chat(top_p=2.0), timeout=30)
    time.sleep(1.5)  # the KV gauges are refreshed every second
    after = scrape_metrics(secure_stack.metrics_port)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta('inflight_requests_total{code="OK",rpc="Generate"}') == 3
    assert delta('inflight_requests_total{code="INVALID_ARGUMENT",rpc="Generate"}') == 1
    assert delta("inflight_generation_tokens_total") == 24
    assert delta("inflight_prompt_tokens_total") == sum(r.usage.prompt_tokens for r in results)
    assert delta("inflight_time_to_first_token_seconds_count") == 3
    assert delta("inflight_time_per_output_token_seconds_count") == 3
    assert delta('inflight_finish_reasons_total{reason="LENGTH"}') == 3
    assert after["inflight_kv_cache_usage_ratio"] == 0.0 and after["inflight_scheduler_running_requests"] == 0
    assert after["inflight_batch_size_mean"] >= 1.0


@pytest.mark.slow
def test_mutual_tls_requires_a_client_certificate_from_the_trusted_ca(pki):
    ca = pki["ca"].cert.read_bytes()
    trusted = {"root": ca, "key": pki["client"].key.read_bytes(), "chain": pki["client"].cert.read_bytes()}
    served = ServedStack(*SMALL, "--tls-cert", str(pki["server"].cert), "--tls-key", str(pki["server"].key),
                         "--tls-client-ca", str(pki["ca"].cert), tls=trusted).wait_ready()
    try:
        assert served.client.complete(chat(max_tokens=4), timeout=60).token_ids
        for tls in ({"root": ca}, {"root": ca, "key": pki["rogue_client"].key.read_bytes(),
                                   "chain": pki["rogue_client"].cert.read_bytes()}):
            with pytest.raises(grpc.RpcError) as raised:
                health_status(served.port, credentials=grpc.ssl_channel_credentials(
                    tls["root"], tls.get("key"), tls.get("chain")), timeout=5)
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        assert served.stop() == 0


@pytest.mark.slow
def test_overload_is_resource_exhausted_and_leaves_the_stack_healthy():
    served = ServedStack(*SMALL, "--max-num-seqs", "1", "--max-waiting-requests", "1",
                         "--max-inflight-per-client", "2").wait_ready()
    try:
        clients = {t: served.make_client(tenant=t) for t in ("a", "b", "c")}
        long = chat("Tell me a long story.", max_tokens=300, ignore_eos=True)
        running = clients["a"].stream(long, timeout=120)
        next(running)  # a runs (one slot)
        waiting = clients["b"].stream(long, timeout=120)
        deadline = time.monotonic() + 10
        while served.stats().requests_waiting < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(grpc.RpcError) as queue_full:
            clients["c"].complete(chat(max_tokens=2), timeout=30)
        # The gateway holds no more than the scheduler can (one running, one waiting): it refuses first.
        assert queue_full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit of 2 requests in flight" in queue_full.value.details()
        second_of_a = clients["a"].stream(long, timeout=120)  # tenant a's second request: allowed, it waits
        with pytest.raises(grpc.RpcError) as too_many:
            clients["a"].complete(chat(max_tokens=2), timeout=30)  # a's third in flight
        assert too_many.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for stream in (running, waiting, second_of_a):
            stream.cancel()
        idle = served.wait_idle()
        assert idle.kv_blocks_free == idle.kv_blocks_total and idle.requests_waiting == 0
        assert clients["c"].complete(chat(max_tokens=4), timeout=60).finish_reason
    finally:
        assert served.stop() == 0


@pytest.mark.slow
def test_sigterm_drains_streams_in_flight_then_exits_cleanly():
    served = ServedStack(*SMALL, "--drain-seconds", "60").wait_ready()
    responses: list[generation_pb2.GenerateResponse] = []
    reader = threading.Thread(target=lambda: responses.extend(
        served.client.stream(chat("Count slowly.", max_tokens=60, ignore_eos=True), timeout=120)))
    reader.start()
    deadline = time.monotonic() + 30
    while len(responses) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    subscription = kv_event_subscription(served)  # a router's long-lived stream, open through the drain
    served.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert health_status(served.port) == health_pb2.HealthCheckResponse.NOT_SERVING  # draining
    reader.join(120)
    assert responses[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert sum(len(r.token_ids) for r in responses) == 60
    assert served.process.wait(60) == 0
    # The subscription ended with a status that says what to do, not with a cancelled handler.
    with pytest.raises(grpc.RpcError) as ended:
        list(subscription)
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE and "resubscribe" in ended.value.details()
    assert "Exception not handled" not in served.log_tail(1000)


def kv_event_subscription(served: ServedStack):  # noqa: ANN201
    from smg_grpc_proto.generated import common_pb2 as smg_common
    from smg_grpc_proto.generated import trtllm_service_pb2_grpc

    stub = trtllm_service_pb2_grpc.TrtllmServiceStub(served.client.channel)
    call = stub.SubscribeKvEvents(smg_common.SubscribeKvEventsRequest(), timeout=120)
    call.initial_metadata()
    return call
