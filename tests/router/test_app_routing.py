"""The request flow of docs/disaggregation-flow.md as the workers see it, with scripted
workers behind the real HTTP server: remote prefill (prefill_only to P, then D with P's
kv_transfer_params and the first token), local prefill below the threshold or without
prefill workers, D recomputing when P fails, prefix-aware choice of the decode worker
from KV events, and the metrics that show each decision."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from common.config.kv_events_config import KVEventsConfig
from common.kv_event_publisher import KVEventPublisher
from common.kv_events import BlockStored
from common.protocol import Abort, GenerateRequest
from router.prefix_index import request_block_hashes
from tests.router.app_harness import embedded_tokenizer, running_router, served_model
from tests.router.fake_worker import EOS, FakeWorker

REPLY = " Paris is the capital of France."


@pytest.fixture(scope="module")
def tokenizer():
    return embedded_tokenizer()


@pytest.fixture(scope="module")
def reply_ids(tokenizer):
    return tokenizer.encode(REPLY, add_special_tokens=False)


def _workers(reply_ids, **prefill_knobs):
    script = lambda prompt: [*reply_ids, EOS]  # noqa: E731
    return FakeWorker(role="decode", script=script), FakeWorker(
        role="prefill", script=script, **prefill_knobs
    )


def _complete(live, **body):
    response = httpx.post(
        live.url + "/v1/completions", json={"prompt": "Capital of France?", **body}, timeout=10
    )
    assert response.status_code == 200, response.text
    return response.json()


def _metric(live, name: str, **labels) -> float:
    text = httpx.get(live.url + "/metrics", timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0])) if "{" in line else {}
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_remote_prefill_sends_prefill_only_to_p_then_the_kv_params_and_first_token_to_d(tokenizer, reply_ids):
    decode, prefill = _workers(reply_ids)
    with running_router(served_model(tokenizer), [decode], [prefill], local_prefill_threshold=0) as live:
        result = _complete(live, max_tokens=50)
        remote = _metric(live, "pdserve_router_prefill_decisions_total", decision="remote")
    assert result["choices"][0]["text"] == REPLY
    (to_prefill,) = prefill.messages(GenerateRequest)
    (to_decode,) = decode.messages(GenerateRequest)
    assert to_prefill.prefill_only and to_prefill.kv_transfer_params is None
    assert not to_decode.prefill_only
    assert to_decode.prompt_token_ids == to_prefill.prompt_token_ids
    assert to_decode.kv_transfer_params == {
        "remote_engine_id": "fake-engine",
        "remote_block_ids": [0],
        "num_tokens": 1,
        "first_token_id": reply_ids[0],
    }
    assert to_decode.sampling_params == to_prefill.sampling_params
    assert remote == 1


def test_the_first_token_streams_before_the_decode_worker_answers(tokenizer, reply_ids):
    decode, prefill = _workers(reply_ids)
    decode.token_interval_s = 1.0  # D is slow: the first token must not wait for it
    with running_router(served_model(tokenizer), [decode], [prefill], local_prefill_threshold=0) as live:
        body = {"prompt": "Capital of France?", "max_tokens": 50, "stream": True}
        with httpx.stream("POST", live.url + "/v1/completions", json=body, timeout=10) as response:
            started = time.monotonic()
            first = next(line for line in response.iter_lines() if line.startswith("data: "))
            waited = time.monotonic() - started
    assert tokenizer.decode([reply_ids[0]]) in first
    assert waited < 0.9


def test_a_first_token_that_finishes_the_request_skips_decode(tokenizer, reply_ids):
    decode, prefill = _workers(reply_ids)
    with running_router(served_model(tokenizer), [decode], [prefill], local_prefill_threshold=0) as live:
        result = _complete(live, max_tokens=1)
    assert result["choices"][0]["finish_reason"] == "length"
    assert result["usage"]["completion_tokens"] == 1
    assert len(prefill.messages(GenerateRequest)) == 1
    assert decode.messages(GenerateRequest) == []


def test_a_short_uncached_prompt_is_prefilled_on_the_decode_worker(tokenizer, reply_ids):
    decode, prefill = _workers(reply_ids)
    with running_router(served_model(tokenizer), [decode], [prefill], local_prefill_threshold=10_000) as live:
        result = _complete(live, max_tokens=50)
        local = _metric(live, "pdserve_router_prefill_decisions_total", decision="local")
    assert result["choices"][0]["text"] == REPLY
    assert prefill.messages(GenerateRequest) == []
    (to_decode,) = decode.messages(GenerateRequest)
    assert to_decode.kv_transfer_params is None and not to_decode.prefill_only
    assert local == 1


def test_without_prefill_workers_the_decode_worker_prefills(tokenizer, reply_ids):
    decode, _ = _workers(reply_ids)
    with running_router(served_model(tokenizer), [decode], local_prefill_threshold=0) as live:
        assert _complete(live, max_tokens=50)["choices"][0]["text"] == REPLY
    (to_decode,) = decode.messages(GenerateRequest)
    assert to_decode.kv_transfer_params is None


def test_a_failing_prefill_worker_falls_back_to_prefill_on_decode(tokenizer, reply_ids):
    decode, prefill = _workers(reply_ids, error=(500, "prefill engine crashed"))
    with running_router(served_model(tokenizer), [decode], [prefill], local_prefill_threshold=0) as live:
        result = _complete(live, max_tokens=50)
        fallback = _metric(live, "pdserve_router_prefill_decisions_total", decision="fallback")
    assert result["choices"][0]["text"] == REPLY
    assert len(prefill.messages(GenerateRequest)) == 1
    (to_decode,) = decode.messages(GenerateRequest)
    assert to_decode.kv_transfer_params is None
    assert fallback == 1


def test_a_client_that_leaves_during_remote_prefill_aborts_it_on_the_prefill_worker(tokenizer, reply_ids):
    decode, prefill = _workers(reply_ids, hold_prefill=True)
    with running_router(served_model(tokenizer), [decode], [prefill], local_prefill_threshold=0) as live:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(live.url + "/v1/completions", json={"prompt": "x", "max_tokens": 5}, timeout=0.5)
        (sent,) = prefill.messages(GenerateRequest)
        assert prefill.wait_for(lambda: [a.request_id for a in prefill.messages(Abort)] == [sent.request_id])
    assert decode.messages(GenerateRequest) == []


def test_a_prefill_worker_that_never_answers_times_out_into_prefill_on_decode(tokenizer, reply_ids):
    decode, prefill = _workers(reply_ids, hold_prefill=True)
    with running_router(
        served_model(tokenizer), [decode], [prefill], local_prefill_threshold=0, worker_reply_timeout_s=0.5
    ) as live:
        result = _complete(live, max_tokens=50)
    assert result["choices"][0]["text"] == REPLY
    (sent,) = prefill.messages(GenerateRequest)
    assert [a.request_id for a in prefill.messages(Abort)] == [sent.request_id]
    (to_decode,) = decode.messages(GenerateRequest)
    assert to_decode.kv_transfer_params is None


def test_a_prefill_worker_refusing_the_request_as_bad_input_is_a_400(tokenizer, reply_ids):
    decode, prefill = _workers(reply_ids, error=(400, "prompt token id out of range"))
    with running_router(served_model(tokenizer), [decode], [prefill], local_prefill_threshold=0) as live:
        response = httpx.post(live.url + "/v1/completions", json={"prompt": "x"}, timeout=10)
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "prompt token id out of range"
    assert decode.messages(GenerateRequest) == []


def test_the_decode_worker_holding_the_prefix_gets_the_request(tokenizer, reply_ids):
    """Worker b publishes (KV events) that it holds the prompt's blocks: the router,
    reading those events, sends the request there, and /metrics shows the overlap. When
    b goes away, its entries go with it."""
    prompt = "You are a helpful assistant. " * 12  # several full 16-token blocks
    prompt_ids = tokenizer.encode(prompt)
    hashes = request_block_hashes(prompt_ids, 16)
    assert len(hashes) >= 4
    events = KVEventsConfig(
        enable_kv_cache_events=True, endpoint="tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*"
    )
    script = lambda p: [*reply_ids, EOS]  # noqa: E731
    with KVEventPublisher(events) as publisher_a, KVEventPublisher(events) as publisher_b:
        workers = []
        for publisher in (publisher_a, publisher_b):
            info = {
                "kv_events_endpoint": publisher.endpoint,
                "kv_replay_endpoint": publisher.replay_endpoint,
                "block_size": 16,
            }
            workers.append(FakeWorker(script=script, info=info))
        a, b = workers
        with running_router(served_model(tokenizer), [a, b]) as live:
            stored = BlockStored(
                block_hashes=hashes,
                parent_block_hash=None,
                token_ids=prompt_ids[: 16 * len(hashes)],
                block_size=16,
            )
            deadline = time.monotonic() + 10
            while _metric(live, "pdserve_router_prefix_index_blocks", worker=b.address) < len(hashes):
                assert time.monotonic() < deadline, "the router never indexed worker b's KV events"
                publisher_b.publish([stored])  # again, in case the subscription was not up yet
                time.sleep(0.2)
            for _ in range(3):
                _complete(live, prompt=prompt, max_tokens=5)
            routed_b = _metric(live, "pdserve_router_requests_routed_total", worker=b.address, role="decode")
            overlap_b = _metric(
                live, "pdserve_router_prefix_overlap_blocks_by_worker_total", worker=b.address
            )
            indexed = _metric(live, "pdserve_router_kv_events_indexed_total", worker=b.address)

            b.stop()  # b goes away: what it cached must not attract requests any more
            assert b.wait_for(
                lambda: _metric(live, "pdserve_router_prefix_index_blocks", worker=b.address) == 0
            )
            _complete(live, prompt=prompt, max_tokens=5)
    assert len(b.messages(GenerateRequest)) == 3
    assert len(a.messages(GenerateRequest)) == 1
    assert routed_b == 3
    assert overlap_b == 3 * len(hashes)
    assert indexed >= 1


def test_request_metrics_are_recorded_under_vllm_names(tokenizer, reply_ids):
    decode, _ = _workers(reply_ids)
    with running_router(served_model(tokenizer), [decode]) as live:
        _complete(live, max_tokens=3)
        _complete(live, max_tokens=50)
        assert _metric(live, "vllm:time_to_first_token_seconds_count") == 2
        assert _metric(live, "vllm:e2e_request_latency_seconds_count") == 2
        assert _metric(live, "vllm:inter_token_latency_seconds_count") == 2 + len(reply_ids)  # EOS is a token
        assert _metric(live, "vllm:request_success_total", finished_reason="length") == 1
        assert _metric(live, "vllm:request_success_total", finished_reason="stop") == 1
        assert _metric(live, "vllm:generation_tokens_total") == 3 + len(reply_ids) + 1
        assert _metric(live, "pdserve_router_worker_healthy", worker=decode.address) == 1


def test_x_request_id_is_honoured_and_echoed(tokenizer, reply_ids):
    decode, _ = _workers(reply_ids)
    with running_router(served_model(tokenizer), [decode]) as live:
        response = httpx.post(
            live.url + "/v1/completions",
            json={"prompt": "hi", "max_tokens": 2},
            headers={"X-Request-Id": "trace-42"},
            timeout=10,
        )
        plain = httpx.get(live.url + "/v1/models", timeout=5)
    assert response.headers["x-request-id"] == "trace-42"
    assert response.json()["id"] == "cmpl-trace-42"
    assert "x-request-id" not in plain.headers
    assert decode.messages(GenerateRequest)[0].request_id.startswith("cmpl-trace-42-0")
