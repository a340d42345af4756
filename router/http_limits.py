"""Size limits on what a client may send, checked before any handler runs.

ASGI middleware: more header lines than --h11-max-header-count, or a header block
larger than --h11-max-incomplete-event-size, is answered 431; a body larger than that
size (by its Content-Length, or as it arrives when sent chunked) is answered 413. The
body is read here in full (it is bounded) and handed on, so a handler never sees a
partial one; after it, the client's disconnect still reaches the handler. Torch-free.
"""

from __future__ import annotations

import json
from typing import Any

Scope = dict[str, Any]
Receive = Any
Send = Any


class HttpLimits:
    def __init__(self, app: Any, max_event_size: int, max_header_count: int) -> None:
        self.app = app
        self.max_event_size = max_event_size
        self.max_header_count = max_header_count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers", [])
        if len(headers) > self.max_header_count:
            await _reject(send, 431, f"the request has {len(headers)} header lines, more than the "
                                     f"{self.max_header_count} allowed (--h11-max-header-count)")  # fmt: skip
            return
        header_bytes = sum(len(name) + len(value) + 4 for name, value in headers)
        if header_bytes > self.max_event_size:
            await _reject(send, 431, f"the request headers take {header_bytes} bytes, more than the "
                                     f"{self.max_event_size} allowed (--h11-max-incomplete-event-size)")  # fmt: skip
            return
        length = _content_length(headers)
        if length is not None and length > self.max_event_size:
            await _reject(send, 413, self._body_message(length))
            return

        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body: nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_event_size:
                await _reject(send, 413, self._body_message(size, at_least=True))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # what follows the body: the client's disconnect

        await self.app(scope, replay, send)

    def _body_message(self, size: int, at_least: bool = False) -> str:
        return (
            f"the request body is {'more than ' if at_least else ''}{size} bytes, larger than the "
            f"{self.max_event_size} allowed (--h11-max-incomplete-event-size); send a smaller request"
        )


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _reject(send: Send, status: int, message: str) -> None:
    error_type = {413: "RequestEntityTooLargeError", 431: "RequestHeaderFieldsTooLargeError"}[status]
    body = json.dumps(
        {"error": {"message": message, "type": error_type, "param": None, "code": status}}
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                        (b"connection", b"close")],
        }
    )  # fmt: skip
    await send({"type": "http.response.body", "body": body})
