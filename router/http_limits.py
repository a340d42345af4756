"""Size limits on what a client may send, checked before any handler runs.

ASGI middleware: more header lines than --h11-max-header-count, or a header block
larger than --h11-max-incomplete-event-size, is answered 431; a body larger than that
size (by its Content-Length, or as it arrives when sent chunked) is answered 413. The
body is read here in full (it is bounded) and handed on, so a handler never sees a
partial one; after it, the client's disconnect still reaches the handler.

A refusal is answered at once, and then what the client still sends of its body is read
and discarded, for a bounded time and size (nginx's lingering close), before the
connection closes: a socket closed with unread data makes the kernel reset the
connection, and a client still sending its body then gets "Connection reset by peer"
instead of the answer. Torch-free.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

Scope = dict[str, Any]
Receive = Any
Send = Any

# How long and how much of a refused body is read after the answer before closing anyway
# (nginx: lingering_time 30 s, lingering_timeout 5 s): a client that sends more than this,
# or stalls, is cut off and may see a reset, but a slow or endless one cannot hold the
# router longer.
DRAIN_MAX_BYTES = 64 * 1024 * 1024
DRAIN_MAX_S = 30.0
DRAIN_IDLE_S = 5.0


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
            message = (f"the request has {len(headers)} header lines, more than the "
                       f"{self.max_header_count} allowed (--h11-max-header-count)")  # fmt: skip
            await _reject(send, receive, headers, 431, message)
            return
        header_bytes = sum(len(name) + len(value) + 4 for name, value in headers)
        if header_bytes > self.max_event_size:
            message = (f"the request headers take {header_bytes} bytes, more than the "
                       f"{self.max_event_size} allowed (--h11-max-incomplete-event-size)")  # fmt: skip
            await _reject(send, receive, headers, 431, message)
            return
        length = _content_length(headers)
        if length is not None and length > self.max_event_size:
            await _reject(send, receive, headers, 413, self._body_message(length))
            return

        chunks: list[bytes] = []
        size = 0
        while True:
            event = await receive()
            if event["type"] == "http.disconnect":
                return  # the client left before sending its body: nobody to answer
            chunk = event.get("body", b"")
            size += len(chunk)
            if size > self.max_event_size:
                more = event.get("more_body", False)
                await _reject(
                    send, receive, headers, 413, self._body_message(size, at_least=more), drain=more
                )
                return
            chunks.append(chunk)
            if not event.get("more_body", False):
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


def _body_follows(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether the client sends a body nobody has read yet. Not when it waits for
    `100 Continue` (it sends nothing until then, and a refusal tells it not to)."""
    values = {name.lower(): value.lower() for name, value in headers}
    if values.get(b"expect") == b"100-continue":
        return False
    return b"transfer-encoding" in values or (_content_length(headers) or 0) > 0


async def _reject(
    send: Send, receive: Receive, headers: list[tuple[bytes, bytes]], status: int, message: str,
    drain: bool | None = None,
) -> None:  # fmt: skip
    """Answer `status` with the OpenAI error body, then read what is left of the request
    body (`drain`; by default whenever one follows the headers), then close."""
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
    # the whole answer goes out now; the server closes the connection only once the
    # response ends, so it ends after the drain
    await send({"type": "http.response.body", "body": body, "more_body": True})
    if drain if drain is not None else _body_follows(headers):
        await _drain(receive)
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _drain(receive: Receive) -> None:
    """Read and drop the request body until it ends, the client leaves, or a bound runs out."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DRAIN_MAX_S
    drained = 0
    while drained <= DRAIN_MAX_BYTES:
        wait_s = min(DRAIN_IDLE_S, deadline - loop.time())
        if wait_s <= 0:
            return
        try:
            async with asyncio.timeout(wait_s):  # unlike wait_for, never swallows a cancellation
                message = await receive()
        except TimeoutError:
            return
        if message["type"] != "http.request":
            return  # the client left
        drained += len(message.get("body", b""))
        if not message.get("more_body", False):
            return
