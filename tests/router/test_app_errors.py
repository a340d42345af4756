"""The router answers every bad request with the OpenAI error body and the right status,
never a 500: invalid JSON and fields (400), prompts longer than the context (400, vLLM's
words), unknown models (404), a wrong API key (401), oversized bodies and headers
(413 / 431), and no healthy worker (503 with Retry-After)."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from tests.router.app_harness import (
    MAX_MODEL_LEN,
    assert_openai_error,
    embedded_tokenizer,
    running_router,
    served_model,
)
from tests.router.fake_worker import EOS, FakeWorker

API_KEY = "sk-test-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def tokenizer():
    return embedded_tokenizer()


@pytest.fixture(scope="module")
def router(tokenizer):
    reply = tokenizer.encode(" fine, thanks", add_special_tokens=False) + [EOS]
    worker = FakeWorker(script=lambda prompt: reply)
    with running_router(served_model(tokenizer), [worker], api_key=API_KEY, max_event_size=64 * 1024) as live:
        yield live


@pytest.fixture(scope="module")
def client(router):
    with httpx.Client(base_url=router.url, headers=AUTH, timeout=10) as http:
        yield http


def test_a_valid_request_with_the_key_succeeds(client):
    response = client.post("/v1/completions", json={"model": "smollm2", "prompt": "How are you?"})
    assert response.status_code == 200
    assert response.json()["choices"][0]["text"] == " fine, thanks"


@pytest.mark.parametrize("header", [None, "Bearer wrong-key", f"Basic {API_KEY}", API_KEY])
def test_a_missing_or_wrong_api_key_is_401(router, header):
    headers = {"Authorization": header} if header else {}
    response = httpx.post(router.url + "/v1/completions", json={"prompt": "x"}, headers=headers, timeout=10)
    error = assert_openai_error(response, 401)
    assert "Authorization: Bearer" in error["message"]
    assert_openai_error(httpx.get(router.url + "/v1/models", headers=headers, timeout=10), 401)


def test_health_and_metrics_need_no_key(router):
    assert httpx.get(router.url + "/health", timeout=10).status_code == 200
    assert httpx.get(router.url + "/metrics", timeout=10).status_code == 200


def test_invalid_json_is_400(client):
    response = client.post(
        "/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"}
    )
    error = assert_openai_error(response, 400)
    assert "not valid JSON" in error["message"]
    assert_openai_error(client.post("/v1/completions", content=b""), 400)
    assert_openai_error(client.post("/v1/completions", json=[1, 2]), 400)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "hi", "temperature": -1}, "temperature"),
        ({"prompt": "hi", "top_p": 0}, "top_p"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "n": 0}, "n"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": "hi", "stop": 3}, "stop"),
        ({"prompt": "hi", "logit_bias": {"not-a-token": 1}}, "logit_bias"),
        ({"prompt": [49152]}, "prompt"),
        ({}, "prompt"),
    ],
)
def test_invalid_completion_fields_are_400_naming_the_field(client, body, param):
    error = assert_openai_error(client.post("/v1/completions", json=body), 400)
    assert error["param"] is not None and error["param"].startswith(param), error


@pytest.mark.parametrize(
    "messages",
    [
        [],
        "hello",
        [{"role": "robot", "content": "hi"}],
        [{"role": "user"}],
        [{"role": "user", "content": [{"type": "image_url"}]}],
    ],
)
def test_malformed_messages_are_400(client, messages):
    error = assert_openai_error(client.post("/v1/chat/completions", json={"messages": messages}), 400)
    assert error["param"] is not None and error["param"].startswith("messages")


def test_a_prompt_over_the_context_is_400_with_vllms_message(client, tokenizer):
    prompt = " word" * (MAX_MODEL_LEN + 10)
    num_tokens = len(tokenizer.encode(prompt))
    response = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 10})
    error = assert_openai_error(response, 400)
    assert error["message"].startswith(
        f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, you requested "
        f"{num_tokens + 10} tokens ({num_tokens} in the messages, 10 in the completion)."
    )


def test_an_unknown_model_is_404(client):
    error = assert_openai_error(client.post("/v1/completions", json={"model": "gpt-9", "prompt": "hi"}), 404)
    assert error["message"] == "The model `gpt-9` does not exist."
    assert error["type"] == "NotFoundError"
    assert_openai_error(client.get("/v1/models/gpt-9"), 404)


def test_an_unknown_path_or_method_gets_the_error_body(client):
    assert_openai_error(client.get("/v1/nothing-here"), 404)
    assert_openai_error(client.get("/v1/completions"), 405)


def test_an_oversized_body_is_413(client):
    response = client.post("/v1/completions", json={"prompt": "x" * (70 * 1024)})
    assert_openai_error(response, 413)

    def chunked():  # no Content-Length: the limit holds as the body arrives
        # just past the limit: the 413 comes once 64 KiB have arrived, the rest is read and dropped
        for _ in range(9):
            yield b"x" * 8192

    assert_openai_error(client.post("/v1/completions", content=chunked()), 413)


@contextmanager
def a_busy_core(seconds: float) -> Iterator[None]:
    """A process spinning on one core beside the test (it stops by itself after `seconds`)."""
    spin = f"import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"
    hog = subprocess.Popen([sys.executable, "-c", spin])
    try:
        yield
    finally:
        hog.kill()
        hog.wait()


def test_a_client_still_sending_a_large_body_gets_the_413_not_a_reset(router):
    """The router answers before reading the body; it must read what the client still sends
    before it closes, or the kernel resets the connection and the answer is lost. Clients
    that send the whole body before reading the answer (http.client, httpx) show it."""
    body = b'{"prompt": "' + b"x" * (8 * 1024 * 1024) + b'"}'
    pieces = [body[i : i + 65536] for i in range(0, len(body), 65536)]
    headers = {**AUTH, "content-type": "application/json"}
    with a_busy_core(120):
        for _ in range(2):
            for chunked in (False, True):
                connection = http.client.HTTPConnection("127.0.0.1", router.port, timeout=30)
                try:
                    if chunked:  # no Content-Length: refused once 64 KiB have arrived
                        connection.request(
                            "POST", "/v1/completions", iter(pieces), headers, encode_chunked=True
                        )
                    else:  # refused by its Content-Length before a byte of it is read
                        connection.request("POST", "/v1/completions", body, headers)
                    response = connection.getresponse()
                    answer = response.read()
                finally:
                    connection.close()
                assert response.status == 413, answer[:200]
                assert json.loads(answer)["error"]["type"] == "RequestEntityTooLargeError"
            with httpx.Client(base_url=router.url, headers=AUTH, timeout=30) as http_client:
                assert_openai_error(http_client.post("/v1/completions", content=body), 413)
                assert_openai_error(http_client.post("/v1/completions", content=iter(pieces)), 413)


def test_a_client_waiting_for_100_continue_gets_the_413_instead(router):
    """It has sent no body and sends none after a refusal: nothing is read, no 100 Continue."""
    head = (
        f"POST /v1/completions HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: {AUTH['Authorization']}\r\n"
        f"content-type: application/json\r\ncontent-length: {8 * 1024 * 1024}\r\nexpect: 100-continue\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", router.port), timeout=30) as sock:
        sock.sendall(head.encode())
        answer = b""
        while chunk := sock.recv(65536):  # until the router closes the connection
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b"RequestEntityTooLargeError" in answer


def test_too_many_or_too_large_headers_are_431(client):
    many = {f"x-extra-{i}": "1" for i in range(300)}
    assert_openai_error(client.get("/v1/models", headers=many), 431)
    assert_openai_error(client.get("/v1/models", headers={"x-big": "y" * (65 * 1024)}), 431)


def test_a_worker_error_for_the_request_reaches_the_client(tokenizer):
    worker = FakeWorker(error=(400, "the worker refused this prompt"))
    with running_router(served_model(tokenizer), [worker]) as live:
        response = httpx.post(live.url + "/v1/completions", json={"prompt": "hi"}, timeout=10)
    error = assert_openai_error(response, 400)
    assert error["message"] == "the worker refused this prompt"


def test_no_healthy_worker_is_503_with_retry_after(tokenizer):
    nobody = FakeWorker()  # never started: nothing answers at its address
    served = served_model(tokenizer)
    with running_router(served, [nobody], wait_healthy=False, start_workers=False) as live:
        health = httpx.get(live.url + "/health", timeout=10)
        assert health.status_code == 503
        assert health.json()["workers"][0]["healthy"] is False
        response = httpx.post(live.url + "/v1/completions", json={"prompt": "hi"}, timeout=10)
        # a bad request is still a 400, not a 503
        bad = httpx.post(live.url + "/v1/completions", json={"prompt": "hi", "n": 0}, timeout=10)
    error = assert_openai_error(response, 503)
    assert "no healthy decode worker" in error["message"]
    assert response.headers["retry-after"] == "1"
    assert_openai_error(bad, 400)


def test_beyond_max_concurrent_requests_and_the_queue_new_ones_get_429_with_retry_after(tokenizer):
    slow = FakeWorker(script=lambda prompt: list(range(1000, 1100)), token_interval_s=0.05)
    with running_router(
        served_model(tokenizer), [slow], max_concurrent_requests=1, max_queued_requests=0
    ) as live:
        body = {"prompt": "hi", "max_tokens": 100, "stream": True}
        with httpx.stream("POST", live.url + "/v1/completions", json=body, timeout=10) as first:
            lines = first.iter_lines()  # kept: dropping it would close the connection
            next(lines)  # the first request is being answered
            refused = httpx.post(live.url + "/v1/completions", json={"prompt": "hi"}, timeout=10)
        error = assert_openai_error(refused, 429)
        assert "--max-concurrent-requests" in error["message"]
        assert int(refused.headers["retry-after"]) >= 1
        # once the first is gone, requests are taken again
        assert slow.wait_for(lambda: live.context.admission.in_flight == 0)
        assert (
            httpx.post(
                live.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=10
            ).status_code
            == 200
        )
