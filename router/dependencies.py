"""What the routes take from each request, declared once: the router's context, the
API key check (/v1 routes, as vLLM does) and the JSON body. Torch-free."""

from __future__ import annotations

import hmac
import json
from typing import Annotated, Any

from fastapi import Depends, Request

from common.openai_api import OpenAIError, bad_request
from router.context import RouterContext


def router_context(request: Request) -> RouterContext:
    return request.app.state.router


async def require_api_key(request: Request) -> None:
    """With --api-key, the request must carry `Authorization: Bearer <key>` (401 otherwise)."""
    expected = router_context(request).config.api_key
    if not expected:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    # compare_digest: the time taken must not tell how much of the key was right
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected.encode()):
        raise OpenAIError(
            401,
            "invalid or missing API key; send it as the header 'Authorization: Bearer <key>'",
            type="AuthenticationError",
        )


async def json_body(request: Request) -> Any:
    """The request body as JSON; a 400 saying where it is broken."""
    raw = await request.body()
    if not raw:
        raise bad_request("the request body is empty; send a JSON object")
    try:
        return json.loads(raw)
    except UnicodeDecodeError:
        raise bad_request("the request body is not UTF-8 text; send a JSON object") from None
    except json.JSONDecodeError as exc:
        raise bad_request(
            f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None


# what a route declares as a parameter to get them
Context = Annotated[RouterContext, Depends(router_context)]
JsonBody = Annotated[Any, Depends(json_body)]
