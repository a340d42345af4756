"""X-Request-Id: a client's id is echoed on the response (and names the request's
completion id when the body gives none); with --enable-request-id-headers every
response carries one, generated when the client sent none. ASGI middleware, so
streaming responses keep it too. Torch-free.
"""

from __future__ import annotations

import uuid
from typing import Any

HEADER = b"x-request-id"
MAX_LENGTH = 256  # a longer id is not echoed (it could not be a sane id)


class RequestIdHeaders:
    def __init__(self, app: Any, always: bool = False) -> None:
        self.app = app
        self.always = always

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = incoming_request_id(scope.get("headers", []))
        if request_id is None and self.always:
            request_id = uuid.uuid4().hex
        if request_id is None:
            await self.app(scope, receive, send)
            return
        value = request_id.encode("latin-1")

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != HEADER]
                message = {**message, "headers": [*headers, (HEADER, value)]}
            await send(message)

        await self.app(scope, receive, send_with_id)


def incoming_request_id(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name.lower() == HEADER:
            try:
                text = value.decode("latin-1").strip()
            except UnicodeDecodeError:
                return None
            return text if 0 < len(text) <= MAX_LENGTH else None
    return None
