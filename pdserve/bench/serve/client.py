"""One streamed request to an OpenAI-compatible server, timed chunk by chunk.

`--backend openai` posts to /v1/completions (`prompt`), `openai-chat` to
/v1/chat/completions (one user message), both with `stream: true` and
`stream_options.include_usage`, so the output token count is the server's own; a request
with a JSON schema sends it as `response_format` json_schema (chat) or
`structured_outputs.json` (completions). Any failure (connection refused, an HTTP error
status, an error event in the stream, a stream that ends without a token) is recorded in
the result, never raised. Torch-free.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from pdserve.bench.serve.datasets import SampleRequest
from pdserve.bench.serve.metrics import RequestResult

BACKENDS = {"openai": "/v1/completions", "vllm": "/v1/completions", "openai-chat": "/v1/chat/completions"}


@dataclass(frozen=True)
class ApiTarget:
    """Where and how to send the requests."""

    url: str  # base URL + endpoint
    model: str
    chat: bool
    api_key: str | None = None
    ignore_eos: bool = False
    sampling: dict[str, Any] = field(default_factory=dict)  # temperature, top_p, ... as given
    extra_body: dict[str, Any] = field(default_factory=dict)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def body(self, request: SampleRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.chat:
            body["messages"] = [{"role": "user", "content": request.prompt}]
            body["max_completion_tokens"] = request.expected_output_len
        else:
            body["prompt"] = request.prompt
            body["max_tokens"] = request.expected_output_len
        body["temperature"] = 0.0
        body.update(self.sampling)
        if self.ignore_eos:
            body["ignore_eos"] = True
        if request.json_schema is not None:
            if self.chat:
                body["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": "answer", "schema": request.json_schema},
                }
            else:
                body["structured_outputs"] = {"json": request.json_schema}
        body.update(self.extra_body)
        return body


async def send_request(client: httpx.AsyncClient, target: ApiTarget, request: SampleRequest) -> RequestResult:
    """Send one request and time its stream; the result says whether it succeeded and why not."""
    result = RequestResult(prompt_len=request.prompt_len)
    chunks = 0
    usage_tokens: int | None = None
    result.start_time = start = time.perf_counter()
    last = start
    try:
        async with client.stream(
            "POST", target.url, json=target.body(request), headers=target.headers()
        ) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {_error_message(await response.aread())}"
                return _finish(result, start)
            async for line in response.aiter_lines():
                data = _sse_data(line)
                if data is None:
                    continue
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = f"error event: {_error_message(data.encode())}"
                    return _finish(result, start)
                text = _chunk_text(chunk, target.chat)
                if text:
                    now = time.perf_counter()
                    if chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    chunks += 1
                    result.generated_text += text
                usage = chunk.get("usage")
                if usage and usage.get("completion_tokens") is not None:
                    usage_tokens = int(usage["completion_tokens"])
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as exc:
        result.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return _finish(result, start)
    if chunks == 0:
        result.error = "the stream ended without a token"
        return _finish(result, start)
    result.success = True
    result.latency = last - start
    result.output_tokens = usage_tokens if usage_tokens is not None else chunks
    return result


def _finish(result: RequestResult, start: float) -> RequestResult:
    result.latency = time.perf_counter() - start
    return result


def _sse_data(line: str) -> str | None:
    """The payload of an SSE `data:` line; None for blank lines, comments and other fields."""
    if not line.startswith("data:"):
        return None
    return line[5:].strip()


def _chunk_text(chunk: dict[str, Any], chat: bool) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if chat:
        return (choice.get("delta") or {}).get("content") or ""
    return choice.get("text") or ""


def _error_message(body: bytes) -> str:
    """The OpenAI error body's message, or the start of whatever the body was."""
    text = body.decode(errors="replace")
    try:
        error = json.loads(text)["error"]
        return str(error.get("message", error)) if isinstance(error, dict) else str(error)
    except (json.JSONDecodeError, KeyError, TypeError):
        return text[:300] or "(empty body)"
