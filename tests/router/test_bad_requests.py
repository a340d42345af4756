"""Malformed and hostile requests against a real stack: `pdserve prefill`, `pdserve decode`
(the embedded model) and `pdserve router` with --api-key, every prompt sent through the
prefill worker (--local-prefill-threshold 0).

Each bad request in BAD_REQUESTS gets its 4xx with the OpenAI error body, and the
message says what was wrong; each hostile request the API allows (HOSTILE_BUT_VALID)
is served; streams and requests the client drops half-way end cleanly. Afterwards the
router still serves, and both workers are back to no running request and no KV block
held (their /metrics), so nothing leaked."""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.harness.stack import RouterProcess, WorkerProcess, wait_until
from tests.router.app_harness import assert_openai_error

MAX_MODEL_LEN = 512
VOCAB = 49152
API_KEY = "sk-bad-input-test"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ENGINE_FLAGS = [
    "--dtype", "float32", "--device", "cpu", "--max-model-len", str(MAX_MODEL_LEN),
    "--num-gpu-blocks-override", "128",
]  # fmt: skip
CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]
TEN_MB = 10 * 1024 * 1024


@dataclass
class Bad:
    name: str
    body: Any  # a value sent as JSON, or bytes sent as they are
    status: int = 400
    says: str = ""  # a piece of the error message
    path: str = "/v1/completions"
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=lambda: dict(AUTH))


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


BAD_REQUESTS = [
    # -- not JSON, or not an object ---------------------------------------------------------
    Bad("truncated JSON", b'{"prompt": "hi", "max_tokens": ', says="not valid JSON"),
    Bad("empty body", b"", says="body is empty"),
    Bad("array body", [1, 2], says="must be a JSON object, got an array"),
    Bad("string body", "hello", says="must be a JSON object, got a string"),
    Bad("null body", None, says="must be a JSON object, got null"),
    Bad("NaN literal", b'{"prompt": "hi", "temperature": NaN}', says="NaN is not a JSON value"),
    Bad("Infinity literal", b'{"prompt": "hi", "top_p": Infinity}', says="Infinity is not a JSON value"),
    Bad("float past 64 bits", b'{"prompt": "hi", "temperature": 1e400}', says="too large for a 64-bit float"),
    Bad("integer of 5000 digits", b'{"prompt": "hi", "seed": 1' + b"0" * 5000 + b"}", says="thousands of digits"),
    Bad("invalid UTF-8", b'{"prompt": "caf\xe9 \xff\xfe"}', says="not UTF-8"),
    Bad("lone surrogate in the prompt", b'{"prompt": "hi \\ud800 there"}', says="lone UTF-16 surrogate"),
    Bad("lone surrogate in a message", {"messages": [{"role": "user", "content": "\udc00"}]},
        path=CHAT, says="lone UTF-16 surrogate"),
    Bad("body nested 100000 deep", nested(100_000), says="nests arrays or objects too deeply"),
    Bad("prompt nested 100000 deep", b'{"prompt": ' + nested(100_000) + b"}", says="too deeply"),
    # -- missing fields --------------------------------------------------------------------------
    Bad("no prompt", {"max_tokens": 5}, says="prompt"),
    Bad("no messages", {"max_tokens": 5}, path=CHAT, says="messages"),
    Bad("no tokens to detokenize", {}, path="/detokenize", says="tokens"),
    # -- wrong types -------------------------------------------------------------------------------
    Bad("prompt a number", {"prompt": 5}, says="prompt must be a string, a list of strings"),
    Bad("prompt an object", {"prompt": {"text": "hi"}}, says="got an object"),
    Bad("prompt a boolean", {"prompt": True}, says="got a boolean"),
    Bad("prompt mixing ids and text", {"prompt": [1, "a"]}, says="got an array that is none of these"),
    Bad("prompt nested arrays", {"prompt": [[[1, 2]]]}, says="none of these"),
    Bad("prompt list of booleans", {"prompt": [True, False]}, says="none of these"),
    Bad("max_tokens a string", {"prompt": "hi", "max_tokens": "ten"}, says="max_tokens"),
    Bad("max_tokens a fraction", {"prompt": "hi", "max_tokens": 1.5}, says="max_tokens"),
    Bad("temperature a string", {"prompt": "hi", "temperature": "hot"}, says="temperature"),
    Bad("n a numeric string", {"prompt": "hi", "n": "2"}, says="n: Input should be a valid integer"),
    Bad("stream a string", {"prompt": "hi", "stream": "yes"}, says="stream"),
    Bad("stop a number", {"prompt": "hi", "stop": 3}, says="stop"),
    Bad("stop a list of numbers", {"prompt": "hi", "stop": [1, 2]}, says="stop"),
    Bad("logit_bias a list", {"prompt": "hi", "logit_bias": [1, 2]}, says="logit_bias"),
    Bad("messages a string", {"messages": "hi"}, path=CHAT, says="messages"),
    Bad("message a string", {"messages": ["hi"]}, path=CHAT, says="messages[0] must be an object"),
    Bad("content a number", {"messages": [{"role": "user", "content": 5}]}, path=CHAT,
        says="content must be a string or a list of text parts"),
    Bad("stream_options a string", {"prompt": "hi", "stream": True, "stream_options": "usage"},
        says="stream_options"),
    Bad("seed a string", {"prompt": "hi", "seed": "42"}, says="seed"),
    Bad("model a number", {"prompt": "hi", "model": 7}, says="model"),
    # -- n -------------------------------------------------------------------------------------------
    Bad("n = 10^6", {"prompt": "hi", "n": 10**6}, says="n must be at most 128"),
    Bad("n = 0", {"prompt": "hi", "n": 0}, says="n must be at least 1"),
    Bad("n = -1", {"prompt": "hi", "n": -1}, says="n must be at least 1"),
    # -- max_tokens --------------------------------------------------------------------------------
    Bad("max_tokens = 0", {"prompt": "hi", "max_tokens": 0}, says="max_tokens must be at least 1"),
    Bad("max_tokens = -5", {"prompt": "hi", "max_tokens": -5}, says="max_tokens must be at least 1"),
    Bad("max_tokens = 10^30", {"prompt": "hi", "max_tokens": 10**30}, says="maximum context length is 512"),
    Bad("max_tokens = 2^64", {"prompt": "hi", "max_tokens": 2**64}, says="maximum context length"),
    Bad("max_completion_tokens = 0", {"messages": HI, "max_completion_tokens": 0}, path=CHAT,
        says="max_tokens must be at least 1"),
    # -- sampling -------------------------------------------------------------------------------------
    Bad("temperature < 0", {"prompt": "hi", "temperature": -0.5}, says="temperature must be non-negative"),
    Bad("top_p = 0", {"prompt": "hi", "top_p": 0}, says="top_p must be in (0, 1]"),
    Bad("top_p > 1", {"prompt": "hi", "top_p": 1.5}, says="top_p must be in (0, 1]"),
    Bad("top_p < 0", {"prompt": "hi", "top_p": -1}, says="top_p must be in (0, 1]"),
    Bad("top_k < -1", {"prompt": "hi", "top_k": -5}, says="top_k"),
    Bad("top_k past 64 bits", {"prompt": "hi", "top_k": 2**70}, says="top_k"),
    Bad("min_p > 1", {"prompt": "hi", "min_p": 2}, says="min_p must be in [0, 1]"),
    Bad("presence_penalty > 2", {"prompt": "hi", "presence_penalty": 5}, says="presence_penalty"),
    Bad("repetition_penalty = 0", {"prompt": "hi", "repetition_penalty": 0}, says="repetition_penalty"),
    Bad("seed past 64 bits", {"prompt": "hi", "seed": 2**70}, says="seed"),
    Bad("priority past 64 bits", {"prompt": "hi", "priority": -(2**70)}, says="priority"),
    Bad("logprobs = 1000", {"prompt": "hi", "logprobs": 1000}, says="logprobs must be in [0, 20]"),
    Bad("top_logprobs = 50", {"messages": HI, "logprobs": True, "top_logprobs": 50}, path=CHAT,
        says="top_logprobs must be in [0, 20]"),
    Bad("top_logprobs without logprobs", {"messages": HI, "top_logprobs": 2}, path=CHAT,
        says="`logprobs` must be set to true"),
    # -- logit_bias, stop --------------------------------------------------------------------------
    Bad("logit_bias id = vocab size", {"prompt": "hi", "logit_bias": {str(VOCAB): 5}},
        says=f"token id {VOCAB} is outside the vocabulary"),
    Bad("logit_bias id < 0", {"prompt": "hi", "logit_bias": {"-1": 5}}, says="outside the vocabulary"),
    Bad("logit_bias id past 64 bits", {"prompt": "hi", "logit_bias": {str(2**80): 5}}, says="outside the vocabulary"),
    Bad("logit_bias key not an id", {"prompt": "hi", "logit_bias": {"hello": 5}}, says="must be token ids"),
    Bad("logit_bias value 1000", {"prompt": "hi", "logit_bias": {"5": 1000}}, says="must be in [-100, 100]"),
    Bad("1000 stop strings", {"prompt": "hi", "stop": [f"stop{i}" for i in range(1000)]},
        says="stop has 1000 strings, more than the 128 allowed"),
    Bad("2000 stop token ids", {"prompt": "hi", "stop_token_ids": [7] * 2000}, says="more than the 1024 allowed"),
    Bad("stop token id outside the vocabulary", {"prompt": "hi", "stop_token_ids": [VOCAB]},
        says="outside the vocabulary"),
    # -- prompts ---------------------------------------------------------------------------------------
    Bad("text prompt over --max-model-len", {"prompt": "word " * 600, "max_tokens": 4},
        says="This model's maximum context length is 512 tokens"),
    Bad("token prompt over --max-model-len", {"prompt": [42] * 600, "max_tokens": 4},
        says="This model's maximum context length is 512 tokens"),
    Bad("token prompt filling the context", {"prompt": [42] * MAX_MODEL_LEN, "max_tokens": None},
        says="leaving no room for the completion"),
    Bad("token id = vocab size", {"prompt": [1, VOCAB]}, says=f"token id {VOCAB} is outside the vocabulary"),
    Bad("token id < 0", {"prompt": [5, -1]}, says="token id -1 is outside the vocabulary"),
    Bad("token id past 64 bits", {"prompt": [2**70]}, says="outside the vocabulary"),
    Bad("token-id lists with one outside", {"prompt": [[1, 2], [3, VOCAB + 7]]}, says="outside the vocabulary"),
    Bad("empty text prompt", {"prompt": ""}, says="empty after tokenization"),
    Bad("empty prompt list", {"prompt": []}, says="prompt must not be empty"),
    Bad("empty token-id list", {"prompt": [[]]}, says="empty"),
    Bad("3000 prompts in one request", {"prompt": ["hi"] * 3000, "max_tokens": 1}, says="3000 choices"),
    Bad("100 prompts x n = 64", {"prompt": ["hi"] * 100, "n": 64, "max_tokens": 1}, says="6400 choices"),
    # -- chat messages ---------------------------------------------------------------------------------
    Bad("empty messages", {"messages": []}, path=CHAT, says="messages must be a non-empty list"),
    Bad("unknown role", {"messages": [{"role": "robot", "content": "hi"}]}, path=CHAT,
        says="role must be one of"),
    Bad("role missing", {"messages": [{"content": "hi"}]}, path=CHAT, says="role must be one of"),
    Bad("content missing", {"messages": [{"role": "user"}]}, path=CHAT, says="content is missing"),
    Bad("image part", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        path=CHAT, says="reads text parts only"),
    Bad("text part without text", {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
        path=CHAT, says="text must be a string"),
    Bad("tool_calls not a list", {"messages": [{"role": "assistant", "content": None, "tool_calls": "x"}]},
        path=CHAT, says="content is missing"),
    Bad("continue and add_generation_prompt", {"messages": HI + [{"role": "assistant", "content": "I"}],
        "continue_final_message": True}, path=CHAT, says="cannot both be true"),
    Bad("a tool without its function", {"messages": HI, "tools": [{"type": "function"}], "tool_choice": "auto"},
        path=CHAT, says='tools[0] has no "function" object'),
    # -- structured outputs: refused by the router before any worker sees them -------------------
    Bad("invalid JSON schema", {"messages": HI, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": 5}}}}, path=CHAT, says="invalid JSON schema"),
    Bad("JSON schema keyword the engine lacks", {"prompt": "hi", "guided_json": {"type": "array", "uniqueItems": True}},
        says="JSON schema uses keywords the grammar engine does not support"),
    Bad("bad regex", {"prompt": "hi", "structured_outputs": {"regex": "a("}}, says="invalid regex"),
    Bad("grammar syntax error", {"prompt": "hi", "structured_outputs": {"grammar": "start: ("}},
        says="grammar syntax error"),
    Bad("empty choice list", {"messages": HI, "guided_choice": []}, path=CHAT, says="guided_choice is an empty list"),
    Bad("two constraints", {"prompt": "hi", "response_format": {"type": "json_object"}, "guided_regex": "a+"},
        says="response_format and guided_regex both constrain the output"),
    Bad("response_format of unknown type", {"messages": HI, "response_format": {"type": "yaml"}}, path=CHAT,
        says="type must be one of"),
    # -- other fields -----------------------------------------------------------------------------------
    Bad("unknown model", {"model": "gpt-9", "prompt": "hi"}, status=404, says="The model `gpt-9` does not exist."),
    Bad("request_id of 1000 characters", {"prompt": "hi", "request_id": "r" * 1000}, says="request_id"),
    Bad("stream_options without stream", {"prompt": "hi", "stream_options": {"include_usage": True}},
        says="only be given when stream is true"),
    Bad("echo with logprobs", {"prompt": "hi", "echo": True, "logprobs": 1}, says="echo"),
    Bad("best_of other than n", {"prompt": "hi", "best_of": 3}, says="best_of"),
    Bad("beam search", {"prompt": "hi", "use_beam_search": True}, says="use_beam_search is not supported"),
    Bad("suffix", {"prompt": "hi", "suffix": "bye"}, says="suffix is not supported"),
    Bad("tokenize prompt and messages", {"prompt": "hi", "messages": HI}, path="/tokenize",
        says="either prompt"),
    Bad("tokenize a number", {"prompt": 5}, path="/tokenize", says="prompt"),
    Bad("detokenize id < 0", {"tokens": [3, -1]}, path="/detokenize", says="outside the vocabulary"),
    Bad("detokenize id past 64 bits", {"tokens": [2**70]}, path="/detokenize", says="outside the vocabulary"),
    # -- HTTP --------------------------------------------------------------------------------------------
    Bad("no API key", {"prompt": "hi"}, status=401, headers={}, says="Authorization: Bearer"),
    Bad("wrong API key", {"prompt": "hi"}, status=401, headers={"Authorization": "Bearer sk-wrong"},
        says="invalid or missing API key"),
    Bad("API key as Basic", {"prompt": "hi"}, status=401, headers={"Authorization": f"Basic {API_KEY}"}),
    Bad("3000 headers", {"prompt": "hi"}, status=431, says="--h11-max-header-count",
        headers={**AUTH, **{f"x-filler-{i}": "1" for i in range(3000)}}),
    Bad("unknown path", {"prompt": "hi"}, status=404, path="/v1/engines/davinci/completions", says="no such endpoint"),
    Bad("wrong method", None, status=405, method="GET", says="GET is not allowed"),
]  # fmt: skip


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("bad-input")
    prefill = WorkerProcess("prefill", [*ENGINE_FLAGS, "--kv-transfer-config", '{"kv_port": 0}'], workdir)
    decode = WorkerProcess("decode", [*ENGINE_FLAGS, "--kv-transfer-config", '{"kv_port": 0}'], workdir)
    router = None
    try:
        prefill.ready()
        decode.ready()
        router = RouterProcess(
            [
                "--prefill-workers", prefill.address, "--decode-workers", decode.address,
                "--max-model-len", str(MAX_MODEL_LEN), "--local-prefill-threshold", "0",
                "--api-key", API_KEY, "--worker-health-timeout", "30",
            ]
        ).ready()  # fmt: skip
        yield router, prefill, decode
    finally:
        for process in (router, decode, prefill):
            if process is not None:
                process.stop()


@pytest.fixture(scope="module")
def client(stack):
    router, _, _ = stack
    with httpx.Client(base_url=router.url, timeout=120) as http:
        yield http


def send(client: httpx.Client, case: Bad) -> httpx.Response:
    if isinstance(case.body, bytes):
        content = case.body
    elif case.method == "GET":
        content = None
    else:
        content = json.dumps(case.body).encode()
    headers = {"content-type": "application/json", **case.headers} if content is not None else case.headers
    return client.request(case.method, case.path, content=content, headers=headers)


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[case.name for case in BAD_REQUESTS])
def test_a_bad_request_gets_its_4xx_with_the_openai_error_body(client, case):
    error = assert_openai_error(send(client, case), case.status)
    assert case.says in error["message"], error


def test_there_are_at_least_fifty_bad_requests():
    assert len(BAD_REQUESTS) >= 50
    assert len({case.name for case in BAD_REQUESTS}) == len(BAD_REQUESTS)


def test_a_10_mb_body_is_413_whether_sized_or_chunked(stack):
    router, _, _ = stack
    body = b'{"prompt": "' + b"x" * TEN_MB + b'"}'
    sized = raw_exchange(router.port, request_head("/v1/completions", len(body)), body)
    assert sized.startswith(b"HTTP/1.1 413"), sized[:200]
    assert b'"RequestEntityTooLargeError"' in sized

    def chunks():
        for _ in range(TEN_MB // 65536):
            yield b"x" * 65536

    head = request_head("/v1/completions", None)
    chunked = raw_exchange(
        router.port, head, b"".join(b"10000\r\n" + c + b"\r\n" for c in chunks()) + b"0\r\n\r\n"
    )
    assert chunked.startswith(b"HTTP/1.1 413"), chunked[:200]


HOSTILE_BUT_VALID = [
    ("128 stop strings", {"prompt": "Count: 1, 2, 3,", "stop": [f"never-{i}" for i in range(128)]}),
    ("1024 stop token ids", {"prompt": "Count: 1, 2, 3,", "stop_token_ids": list(range(40000, 41024))}),
    ("a logit_bias on 2000 ids", {"prompt": "Count:", "logit_bias": {str(i): -1 for i in range(1000, 3000)}}),
    ("n = 8 seeded", {"prompt": "Once upon a time", "n": 8, "seed": 2**64 - 1, "temperature": 1.0}),
    ("a prompt filling the context", {"prompt": [42] * (MAX_MODEL_LEN - 2), "max_tokens": 2}),
    ("temperature 10^300", {"prompt": "hi", "temperature": 1e300}),
    ("a client's kv_transfer_params", {"prompt": "hi", "kv_transfer_params": {"remote_host": "10.9.9.9",
                                        "remote_port": 1, "remote_block_ids": [1, 2, 3]}}),
    ("unknown fields", {"prompt": "hi", "provider_specific": {"deep": [1, {"x": None}]}, "functions": []}),
    ("a surrogate pair (valid)", {"prompt": "emoji \U0001f600 here"}),
    ("NUL and control characters", {"prompt": "a\u0000b\u0007c\u001b[31m"}),
]  # fmt: skip


@pytest.mark.parametrize(("name", "body"), HOSTILE_BUT_VALID, ids=[name for name, _ in HOSTILE_BUT_VALID])
def test_a_hostile_request_the_api_allows_is_served(client, name, body):
    response = client.post("/v1/completions", json={"max_tokens": 4, **body}, headers=AUTH)
    assert response.status_code == 200, response.text
    choices = response.json()["choices"]
    assert len(choices) == body.get("n", 1)
    assert all(choice["finish_reason"] in ("stop", "length") for choice in choices)


def test_streams_dropped_half_way_end_cleanly(stack):
    router, prefill, decode = stack
    aborted_before = aborted(decode)
    ran_to_the_end_before = finished_by_length(prefill) + finished_by_length(decode)
    long_prompt = "Write a long story about a dragon who learns to bake bread. " * 6
    choices_seen = 0
    for body in (
        {"prompt": "Tell me a very long story.", "max_tokens": 300},
        {"messages": [{"role": "user", "content": "Tell me a very long story."}], "max_tokens": 300},
        {"prompt": "Tell me a story.", "n": 4, "max_tokens": 300, "stream_options": {"include_usage": True}},
    ):
        body = {**body, "stream": True, "ignore_eos": True}  # long enough to leave in the middle
        path = CHAT if "messages" in body else "/v1/completions"
        with httpx.Client(base_url=router.url, timeout=120) as http:
            with http.stream("POST", path, json=body, headers=AUTH) as response:
                assert response.status_code == 200
                lines = response.iter_lines()
                received = [
                    line for line, _ in zip(lines, range(6), strict=False) if line.startswith("data: ")
                ]
                assert received and all(line != "data: [DONE]" for line in received)
        # leaving both blocks closed the connection half-way
        choices_seen += len(
            {choice["index"] for line in received for choice in json.loads(line[6:])["choices"]}
        )

    # dropped before the first token: the prompt is still being prefilled
    head = request_head("/v1/completions", None)
    body = json.dumps({"prompt": long_prompt, "max_tokens": 200, "stream": True, "ignore_eos": True}).encode()
    hang_up_after(router.port, head.replace(b"transfer-encoding: chunked", f"content-length: {len(body)}".encode()),
                  body, seconds=0.05)  # fmt: skip
    # a request that is not streamed, dropped while it runs
    body = json.dumps({"prompt": long_prompt, "max_tokens": 200, "ignore_eos": True}).encode()
    hang_up_after(router.port, request_head("/v1/completions", len(body)), body, seconds=1.0)

    # A choice the client saw a chunk of had been sent on to the decode worker before the
    # chunk went out (the router does so as it takes the prefill worker's first token), so
    # the decode worker aborts each one. A choice the client saw nothing of may have been
    # stopped on the prefill worker, or have just finished its prefill there (which counts
    # no abort) and never reach the decode worker: they are not counted.
    wait_until(
        lambda: aborted(decode) >= aborted_before + choices_seen, 60, "the decode worker aborting them"
    )
    # None of them ran to its end: once nothing runs anywhere, no request finished by length.
    wait_until(
        lambda: (
            metric_sum(router.url, "pdserve_router_requests_in_flight") == 0
            and not any(busy(worker) for worker in (prefill, decode))
        ),
        60,
        "the router and both workers running nothing",
    )
    assert finished_by_length(prefill) + finished_by_length(decode) == ran_to_the_end_before


def test_afterwards_the_router_serves_and_no_kv_block_or_request_leaked(stack, client):
    router, prefill, decode = stack
    response = client.post("/v1/completions", json={"prompt": "The capital of France is", "max_tokens": 3},
                           headers=AUTH)  # fmt: skip
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 3
    assert client.get("/health").status_code == 200

    def idle(worker: WorkerProcess) -> bool:
        series = worker_metrics(worker)
        return all(
            series.get(name, 0.0) == 0.0
            for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                         "pdserve:kv_held_requests")
        )  # fmt: skip

    for worker in (prefill, decode):
        wait_until(
            lambda w=worker: idle(w), 60, f"the {worker.name} worker going back to idle with no KV held"
        )
    assert metric_sum(router.url, "pdserve_router_requests_in_flight") == 0
    for process in (router, prefill, decode):
        process.check_running()


# -- raw HTTP, for what a well-behaved client library will not send -----------------------------


def request_head(path: str, content_length: int | None) -> bytes:
    length = (
        f"content-length: {content_length}" if content_length is not None else "transfer-encoding: chunked"
    )
    return (
        f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {API_KEY}\r\n"
        f"content-type: application/json\r\n{length}\r\n\r\n"
    ).encode()


def raw_exchange(port: int, head: bytes, body: bytes, timeout_s: float = 60.0) -> bytes:
    """Send head and body (from a thread: the server may answer, and close, before it has
    read everything) and return what the server answered until it closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:

        def write() -> None:
            try:
                sock.sendall(head + body)
            except OSError:
                pass  # the server answered early and closed: expected for a refused body

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        answer = b""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            answer += chunk
            if b"\r\n\r\n" in answer and answer.rstrip().endswith(b"}"):
                break  # a whole JSON answer
        writer.join(5)
        return answer


def hang_up_after(port: int, head: bytes, body: bytes, seconds: float) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head + body)
        time.sleep(seconds)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST


def worker_metrics(worker: WorkerProcess) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{worker.info['metrics_port']}/metrics", timeout=10).text
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            name = series.partition("{")[0]
            values[name] = values.get(name, 0.0) + float(value)
    return values


def aborted(worker: WorkerProcess) -> float:
    return worker_metrics_labelled(worker, "vllm:request_success_total", 'finished_reason="abort"')


def finished_by_length(worker: WorkerProcess) -> float:
    """Requests the worker ran to their max_tokens (or the context's end)."""
    return worker_metrics_labelled(worker, "vllm:request_success_total", 'finished_reason="length"')


def busy(worker: WorkerProcess) -> bool:
    series = worker_metrics(worker)
    return series.get("vllm:num_requests_running", 0.0) + series.get("vllm:num_requests_waiting", 0.0) > 0


def worker_metrics_labelled(worker: WorkerProcess, name: str, label: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{worker.info['metrics_port']}/metrics", timeout=10).text
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith(name + "{") and label in line
    )


def metric_sum(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line and not line.startswith("#") and line.partition("{")[0].partition(" ")[0] == name
    )
