"""What the routes take from each request, declared once: the router's context, the
API key check, who may reach which endpoint, and the JSON body. Torch-free.

With --api-key, the /v1 routes and /tokenize, /detokenize need one of the keys; /metrics
and /health (with /ping) follow --metrics-access and --health-access (public by default,
as in vLLM; docs/security.md). Request bodies are logged only with --enable-log-requests,
cut to --max-log-len characters; keys and headers never are.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from typing import Annotated, Any

from fastapi import Depends, Request

from common.openai_api import OpenAIError
from common.openai_api.json_body import parse_json_body
from router.context import RouterContext

request_logger = logging.getLogger("pdserve.router.requests")

_ACCESS_BY_PATH = {"/metrics": "metrics_access", "/health": "health_access", "/ping": "health_access"}
_KEYED_PATHS = ("/tokenize", "/detokenize")


def router_context(request: Request) -> RouterContext:
    return request.app.state.router


def api_key_matches(given: str, keys: list[str]) -> bool:
    """Whether `given` is one of `keys`, in a time that tells nothing about how much of
    which key was right: digests of equal length compared in constant time, every key
    compared (no early exit)."""
    given_digest = hashlib.sha256(given.encode("utf-8", "surrogateescape")).digest()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given_digest, hashlib.sha256(key.encode()).digest())
    return matched


async def require_api_key(request: Request) -> None:
    """With --api-key, the request must carry `Authorization: Bearer <key>` (401 otherwise)."""
    keys = router_context(request).config.api_keys
    if not keys:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not api_key_matches(given.strip(), keys):
        raise OpenAIError(
            401,
            "invalid or missing API key; send it as the header 'Authorization: Bearer <key>'",
            type="AuthenticationError",
        )


async def endpoint_access(request: Request) -> None:
    """Every route's gate (an app-wide dependency): the API key where one is needed, 404
    for a disabled endpoint."""
    path = request.url.path
    setting = _ACCESS_BY_PATH.get(path)
    if setting is not None:
        access = getattr(router_context(request).config, setting)
        if access == "disabled":
            raise OpenAIError(404, f"{path} is disabled on this server (--{setting.replace('_', '-')})")
        if access == "public":
            return
    elif not (path.startswith("/v1/") or path in _KEYED_PATHS):
        return  # /version and the API docs
    await require_api_key(request)


async def json_body(request: Request) -> Any:
    """The request body as JSON; a 400 saying where it is broken."""
    raw = await request.body()
    config = router_context(request).config
    if config.enable_log_requests:
        text = raw.decode("utf-8", "replace")
        if config.max_log_len is not None and len(text) > config.max_log_len:
            text = text[: config.max_log_len] + f"... ({len(text)} characters)"
        request_logger.info("request %s %s: %s", request.method, request.url.path, text)
    return parse_json_body(raw)


# what a route declares as a parameter to get them
Context = Annotated[RouterContext, Depends(router_context)]
JsonBody = Annotated[Any, Depends(json_body)]
