"""A small client of a running OpenAI-compatible server (`pdserve serve`, `pdserve
router`, or any other), for `pdserve chat`, `pdserve complete` and `pdserve run-batch
--url`: the flags they share, the model lookup, plain and streamed (SSE) requests, and
errors that say what went wrong and what to do. Torch-free (httpx).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import httpx

DEFAULT_URL = "http://localhost:8000/v1"
API_KEY_ENVS = ("OPENAI_API_KEY", "PDSERVE_API_KEY")
DEFAULT_TIMEOUT_S = 600.0  # a CPU server can take long over a long answer


class ApiError(RuntimeError):
    """A request failed; the message says why and what to do."""


def add_server_args(parser: Any, *, url_default: str | None = DEFAULT_URL, model: bool = True) -> None:
    """--url, --model-name and --api-key, as `vllm chat` / `vllm complete` name them."""
    parser.add_argument(
        "--url",
        default=url_default,
        help="URL of the running OpenAI-compatible API server (its /v1 is added when left out)."
        + ("" if url_default else " (default: none: run the engine in this process)"),
    )
    if model:
        parser.add_argument(
            "--model-name",
            "--model",
            dest="model_name",
            default=None,
            help="The model name to ask for. (default: the first model the server lists at /v1/models)",
        )
    parser.add_argument(
        "--api-key",
        default=None,
        help=f"API key sent as 'Authorization: Bearer KEY'. (default: the {' or '.join(API_KEY_ENVS)} "
        "environment variable, else none)",
    )


def api_base(url: str) -> str:
    """`url` as the base of the /v1 endpoints: http://host:8000 -> http://host:8000/v1."""
    base = url.strip().rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise ApiError(f"--url {url!r} must start with http:// or https://, e.g. {DEFAULT_URL}")
    return base if base.endswith("/v1") else base + "/v1"


class ApiClient:
    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.base = api_base(url)
        key = api_key or next((os.environ[e] for e in API_KEY_ENVS if os.environ.get(e)), None)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(
            base_url=self.base, headers=headers, timeout=httpx.Timeout(timeout_s, connect=10.0)
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def model(self, requested: str | None = None) -> str:
        """`requested`, or the first model the server serves."""
        if requested:
            return requested
        body = self._check(self._send("GET", "/models")).json()
        models = [m.get("id") for m in body.get("data", []) if isinstance(m, dict)]
        if not models or not isinstance(models[0], str):
            raise ApiError(f"the server at {self.base} lists no model at /v1/models; pass --model-name")
        return models[0]

    def post(self, path: str, body: Any) -> httpx.Response:
        """POST `body` as JSON to `path` (/completions, /chat/completions): the response,
        whatever its status. ApiError when the server cannot be reached."""
        return self._send("POST", path, json=body)

    def stream(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """POST `body` with stream=true and yield each server-sent event's JSON; ApiError for
        an error status or an error event."""
        try:
            with self._http.stream("POST", path, json={**body, "stream": True}) as response:
                if response.status_code != 200:
                    response.read()
                    self._check(response)
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[len("data:") :].strip()
                    if data == "[DONE]":
                        return
                    event = json.loads(data)
                    if isinstance(event, dict) and "error" in event:
                        raise ApiError(f"the server failed the request: {_error_text(event)}")
                    yield event
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        except json.JSONDecodeError as exc:
            raise ApiError(f"the server at {self.base} sent an event that is not JSON: {exc}") from None

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None

    def _unreachable(self, exc: Exception) -> ApiError:
        return ApiError(
            f"cannot reach the server at {self.base} ({type(exc).__name__}: {exc}); is it running? "
            "Start one with `pdserve serve`, or point --url at it"
        )

    def _check(self, response: httpx.Response) -> httpx.Response:
        if response.status_code == 200:
            return response
        try:
            detail = _error_text(response.json())
        except ValueError:
            detail = response.text[:500]
        if response.status_code == 401:
            raise ApiError(
                f"the server refused the API key (401: {detail}); pass --api-key or set {API_KEY_ENVS[0]}"
            )
        raise ApiError(f"the server answered {response.status_code}: {detail}")


def _error_text(body: Any) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    if isinstance(error, str):
        return error
    return json.dumps(body)[:500]
