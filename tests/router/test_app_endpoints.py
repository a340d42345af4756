"""The router's other endpoints: /v1/models, /tokenize, /detokenize, /health, /ping,
/version, /metrics; and importing the app leaves torch (and triton) unloaded."""

from __future__ import annotations

import httpx
import pytest

from tests.harness.torch_free import assert_imports_without_torch
from tests.router.app_harness import (
    MAX_MODEL_LEN,
    SERVED_NAMES,
    assert_openai_error,
    embedded_tokenizer,
    running_router,
    served_model,
)
from tests.router.fake_worker import FakeWorker


@pytest.fixture(scope="module")
def tokenizer():
    return embedded_tokenizer()


@pytest.fixture(scope="module")
def router(tokenizer):
    with running_router(served_model(tokenizer), [FakeWorker()], [FakeWorker(role="prefill")]) as live:
        yield live


def test_importing_the_router_app_does_not_import_torch():
    assert_imports_without_torch("router.app", "router.cli", timeout_s=60)


def test_models_lists_every_served_name_with_the_context_length(router):
    body = httpx.get(router.url + "/v1/models", timeout=5).json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == SERVED_NAMES
    for card in body["data"]:
        assert card["object"] == "model" and card["owned_by"] == "pdserve"
        assert card["max_model_len"] == MAX_MODEL_LEN and isinstance(card["created"], int)
    assert httpx.get(router.url + "/v1/models/smollm2-alias", timeout=5).json()["id"] == "smollm2-alias"


def test_tokenize_and_detokenize_round_trip(router, tokenizer):
    body = httpx.post(
        router.url + "/tokenize", json={"prompt": "Hello world", "return_token_strs": True}, timeout=5
    )
    result = body.json()
    assert result["tokens"] == tokenizer.encode("Hello world")
    assert result["count"] == len(result["tokens"]) and result["max_model_len"] == MAX_MODEL_LEN
    assert result["token_strs"] == tokenizer.convert_ids_to_tokens(result["tokens"])
    text = httpx.post(router.url + "/detokenize", json={"tokens": result["tokens"]}, timeout=5).json()
    assert text == {"prompt": tokenizer.decode(result["tokens"])}


def test_tokenize_messages_applies_the_chat_template(router, tokenizer):
    messages = [{"role": "user", "content": "Hi"}]
    result = httpx.post(router.url + "/tokenize", json={"messages": messages}, timeout=5).json()
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert result["tokens"] == tokenizer.encode(rendered, add_special_tokens=False)


def test_tokenize_errors(router):
    assert_openai_error(httpx.post(router.url + "/tokenize", json={}, timeout=5), 400)
    assert_openai_error(
        httpx.post(router.url + "/tokenize", json={"model": "other", "prompt": "x"}, timeout=5), 404
    )
    assert_openai_error(httpx.post(router.url + "/detokenize", json={"tokens": [-1]}, timeout=5), 400)
    assert_openai_error(httpx.post(router.url + "/detokenize", json={"tokens": "abc"}, timeout=5), 400)


def test_health_ping_and_version(router):
    health = httpx.get(router.url + "/health", timeout=5)
    assert health.status_code == 200
    assert {(w["role"], w["healthy"]) for w in health.json()["workers"]} == {
        ("prefill", True),
        ("decode", True),
    }
    assert httpx.get(router.url + "/ping", timeout=5).status_code == 200
    assert httpx.post(router.url + "/ping", timeout=5).status_code == 200
    assert isinstance(httpx.get(router.url + "/version", timeout=5).json()["version"], str)


def test_health_is_503_while_a_configured_role_has_no_healthy_worker(tokenizer):
    missing_prefill = FakeWorker(role="prefill")  # never started
    decode = FakeWorker().start()
    try:
        served = served_model(tokenizer)
        with running_router(
            served, [decode], [missing_prefill], wait_healthy=False, start_workers=False
        ) as live:
            assert decode.wait_for(
                lambda: live.context.pool.num_healthy(live.context.pool.clients()[1].state.role)
            )
            health = httpx.get(live.url + "/health", timeout=5)
            assert health.status_code == 503
            assert health.json()["message"] == "no healthy prefill worker"
            # the decode worker still answers: it prefills itself
            response = httpx.post(
                live.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1}, timeout=10
            )
            assert response.status_code == 200
    finally:
        decode.stop()


def test_metrics_is_prometheus_text(router):
    response = httpx.get(router.url + "/metrics", timeout=5)
    assert response.headers["content-type"].startswith("text/plain")
    for name in (
        "vllm:time_to_first_token_seconds",
        "vllm:e2e_request_latency_seconds",
        "vllm:request_success_total",
        "pdserve_router_worker_healthy",
        "pdserve_router_kv_event_seq_gaps_total",
        "pdserve_router_kv_event_replays_total",
        "pdserve_router_kv_event_batches_received_total",
    ):
        assert f"# TYPE {name.removesuffix('_total')}" in response.text, name
