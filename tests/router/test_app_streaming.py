"""Streaming and the text side of responses, through the real HTTP server: SSE framing
ending in [DONE], the usage chunk, n choices, stop strings cut in the router (and the
worker's request aborted), logprobs and echo, a client that leaves (abort), and a worker
that fails or dies mid-stream (an error event, then [DONE], never a hang)."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from common.protocol import Abort, GenerateRequest
from tests.router.app_harness import embedded_tokenizer, running_router, served_model, sse_events
from tests.router.fake_worker import EOS, FakeWorker

REPLY = " The sky is blue. STOP and then some more words that follow"


@pytest.fixture(scope="module")
def tokenizer():
    return embedded_tokenizer()


@pytest.fixture(scope="module")
def reply_ids(tokenizer):
    return tokenizer.encode(REPLY, add_special_tokens=False)


@pytest.fixture(scope="module")
def worker(reply_ids):
    return FakeWorker(script=lambda prompt: [*reply_ids, EOS])


@pytest.fixture(scope="module")
def router(tokenizer, worker):
    with running_router(served_model(tokenizer), [worker]) as live:
        yield live


def _post(router, path, body, **kwargs):
    return httpx.post(router.url + path, json=body, timeout=10, **kwargs)


def _chunks(response):
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    assert "[DONE]" not in events[:-1]
    return [json.loads(e) for e in events[:-1]]


def _aborted_ids(worker):
    return {m.request_id for m in worker.messages(Abort)}


def _request_ids(worker):
    return [m.request_id for m in worker.messages(GenerateRequest)]


def test_streamed_completion_text_equals_the_whole_response(router):
    whole = _post(router, "/v1/completions", {"prompt": "Tell me", "max_tokens": 100}).json()
    streamed = _post(router, "/v1/completions", {"prompt": "Tell me", "max_tokens": 100, "stream": True})
    assert streamed.headers["content-type"].startswith("text/event-stream")
    chunks = _chunks(streamed)
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert "usage" not in chunks[0]  # only with include_usage
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"] == REPLY
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "stop"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_include_usage_adds_one_usage_chunk_before_done(router, reply_ids):
    body = {"prompt": "Tell me", "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}}
    chunks = _chunks(_post(router, "/v1/completions", body))
    *text_chunks, last = chunks
    assert all(c["usage"] is None for c in text_chunks)
    assert last["choices"] == []
    prompt_tokens = last["usage"]["prompt_tokens"]
    assert prompt_tokens > 0
    assert last["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 5,
        "total_tokens": prompt_tokens + 5,
    }
    assert text_chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_stream_options_without_stream_is_400(router):
    response = _post(router, "/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}})
    assert response.status_code == 400


def test_chat_stream_with_n_2_gives_both_choices_with_role_first(router):
    body = {"messages": [{"role": "user", "content": "Hi"}], "n": 2, "stream": True, "max_tokens": 4}
    chunks = _chunks(_post(router, "/v1/chat/completions", body))
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    by_index: dict[int, list] = {0: [], 1: []}
    for chunk in chunks:
        (choice,) = chunk["choices"]
        by_index[choice["index"]].append(choice)
    for choices in by_index.values():
        assert choices[0]["delta"]["role"] == "assistant"
        assert all("role" not in c["delta"] for c in choices[1:])
        assert choices[-1]["finish_reason"] == "length"
        text = "".join(c["delta"]["content"] for c in choices)
        assert REPLY.startswith(text) and text


def test_chat_n_2_whole_response_has_two_choices_and_counts_the_prompt_once(router):
    body = {"messages": [{"role": "user", "content": "Hi"}], "n": 2, "max_tokens": 3}
    result = _post(router, "/v1/chat/completions", body).json()
    assert [c["index"] for c in result["choices"]] == [0, 1]
    assert all(c["message"]["role"] == "assistant" for c in result["choices"])
    assert result["usage"]["completion_tokens"] == 6
    single = _post(router, "/v1/chat/completions", {**body, "n": 1}).json()
    assert result["usage"]["prompt_tokens"] == single["usage"]["prompt_tokens"]


def test_a_stop_string_cuts_the_text_and_aborts_the_worker_request(router, worker):
    before = len(_request_ids(worker))
    result = _post(router, "/v1/completions", {"prompt": "Sky?", "max_tokens": 100, "stop": ["STOP"]}).json()
    choice = result["choices"][0]
    assert choice["text"] == " The sky is blue. "
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", "STOP")
    (request_id,) = _request_ids(worker)[before:]
    assert worker.wait_for(lambda: request_id in _aborted_ids(worker))


def test_a_stop_string_in_a_stream_and_include_stop_str_in_output(router, worker):
    body = {
        "prompt": "Sky?",
        "max_tokens": 100,
        "stop": "blue",
        "stream": True,
        "include_stop_str_in_output": True,
    }
    chunks = _chunks(_post(router, "/v1/completions", body))
    assert "".join(c["choices"][0]["text"] for c in chunks) == " The sky is blue"
    assert chunks[-1]["choices"][0]["stop_reason"] == "blue"
    request_id = _request_ids(worker)[-1]
    assert worker.wait_for(lambda: request_id in _aborted_ids(worker))


def test_completion_logprobs_and_echo(router, reply_ids, tokenizer):
    body = {"prompt": "Sky?", "max_tokens": 3, "logprobs": 2}
    logprobs = _post(router, "/v1/completions", body).json()["choices"][0]["logprobs"]
    assert logprobs["tokens"] == [tokenizer.decode([t], skip_special_tokens=False) for t in reply_ids[:3]]
    assert logprobs["token_logprobs"] == [-0.25] * 3
    assert all(len(top) == 2 for top in logprobs["top_logprobs"])
    echoed = _post(router, "/v1/completions", {"prompt": "Sky?", "max_tokens": 3, "echo": True}).json()
    assert echoed["choices"][0]["text"].startswith("Sky?")


def test_chat_logprobs_in_a_stream(router):
    body = {
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 3,
        "logprobs": True,
        "top_logprobs": 1,
        "stream": True,
    }
    chunks = _chunks(_post(router, "/v1/chat/completions", body))
    entries = [
        e for c in chunks if c["choices"][0]["logprobs"] for e in c["choices"][0]["logprobs"]["content"]
    ]
    assert len(entries) == 3
    assert all(e["logprob"] == -0.25 and len(e["top_logprobs"]) == 1 for e in entries)


def test_a_client_that_leaves_mid_stream_aborts_the_worker_request(tokenizer):
    slow = FakeWorker(script=lambda prompt: list(range(1000, 1200)), token_interval_s=0.05)
    with running_router(served_model(tokenizer), [slow]) as live:
        body = {"prompt": "Go on", "max_tokens": 200, "stream": True}
        with httpx.stream("POST", live.url + "/v1/completions", json=body, timeout=10) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
        (request_id,) = _request_ids(slow)
        assert slow.wait_for(lambda: request_id in _aborted_ids(slow), timeout_s=5)


def test_a_client_that_leaves_a_whole_response_aborts_the_worker_request(tokenizer):
    slow = FakeWorker(script=lambda prompt: list(range(1000, 1200)), token_interval_s=0.05)
    with running_router(served_model(tokenizer), [slow]) as live:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(live.url + "/v1/completions", json={"prompt": "Go on", "max_tokens": 200}, timeout=0.5)
        (request_id,) = _request_ids(slow)
        assert slow.wait_for(lambda: request_id in _aborted_ids(slow), timeout_s=5), slow.received


def test_a_worker_error_mid_stream_is_an_error_event_then_done(tokenizer, reply_ids):
    failing = FakeWorker(script=lambda prompt: [*reply_ids, EOS], error_after_tokens=3)
    with running_router(served_model(tokenizer), [failing]) as live:
        streamed = _post(live, "/v1/completions", {"prompt": "x", "max_tokens": 50, "stream": True})
        whole = _post(live, "/v1/completions", {"prompt": "x", "max_tokens": 50})
    events = sse_events(streamed)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == 500 and "failed on purpose" in error["message"]
    assert all("choices" in json.loads(e) for e in events[:-2])
    assert (
        whole.status_code == 500 and whole.json()["error"]["message"] == "the fake worker failed on purpose"
    )


def test_a_worker_that_dies_mid_stream_ends_the_stream_with_an_error(tokenizer):
    dying = FakeWorker(script=lambda prompt: list(range(1000, 1200)), token_interval_s=0.05)
    with running_router(served_model(tokenizer), [dying]) as live:
        started = time.monotonic()
        body = {"prompt": "Go on", "max_tokens": 200, "stream": True}
        with httpx.stream("POST", live.url + "/v1/completions", json=body, timeout=10) as response:
            events = []
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[len("data: ") :])
                    if len(events) == 3:
                        dying.stop()  # its socket closes, as when the process is killed
        assert time.monotonic() - started < 8
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == 503 and "connection to worker" in error["message"]
        health = httpx.get(live.url + "/health", timeout=5)
        assert health.status_code == 503
        refused = httpx.post(live.url + "/v1/completions", json={"prompt": "again"}, timeout=5)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"


def test_a_worker_silent_for_a_while_keeps_its_requests(tokenizer, reply_ids):
    """Silence (a long engine step) takes a worker out of /health, but what runs there
    goes on, and a new request still reaches it rather than being refused."""
    busy = FakeWorker(script=lambda prompt: [*reply_ids, EOS], token_interval_s=0.05)
    with running_router(served_model(tokenizer), [busy], worker_health_timeout_s=0.3) as live:
        body = {"prompt": "Go on", "max_tokens": 50, "stream": True}
        with (
            ThreadPoolExecutor(1) as pool,
            httpx.stream("POST", live.url + "/v1/completions", json=body, timeout=10) as response,
        ):
            texts = []
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                texts.append(json.loads(line[len("data: ") :])["choices"][0]["text"])
                if len(texts) == 2:
                    busy.silent = True
                    assert busy.wait_for(
                        lambda: httpx.get(live.url + "/health", timeout=5).status_code == 503
                    )
                    late = pool.submit(_post, live, "/v1/completions", {"prompt": "late", "max_tokens": 2})
                    time.sleep(0.5)
                    busy.silent = False
            assert late.result().status_code == 200
        assert "".join(texts) == REPLY


def test_a_worker_that_restarts_mid_stream_ends_the_stream_with_an_error(tokenizer):
    worker = FakeWorker(script=lambda prompt: list(range(1000, 1200)), token_interval_s=0.05)
    with running_router(served_model(tokenizer), [worker]) as live:
        body = {"prompt": "Go on", "max_tokens": 200, "stream": True}
        with httpx.stream("POST", live.url + "/v1/completions", json=body, timeout=10) as response:
            events = []
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[len("data: ") :])
                    if len(events) == 2:
                        worker.restart()
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == 503 and "restarted" in error["message"]
        # the new instance serves the next request
        assert _post(live, "/v1/completions", {"prompt": "again", "max_tokens": 2}).status_code == 200
