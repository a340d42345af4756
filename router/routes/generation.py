"""What /v1/completions and /v1/chat/completions share: validate and tokenize the body,
refuse when no worker can take it, wait for an admission slot (router/admission.py:
bounded, 429 beyond), then answer as a whole body or as server-sent events. Torch-free."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from common.openai_api import ChatCompletionRequest, CompletionRequest, PreparedRequest, ServedModel
from common.protocol import WorkerRole
from router.admission import ClientGone, Slot
from router.completion_run import CompletionRun
from router.context import RouterContext
from router.errors import no_worker_available
from router.request_id import incoming_request_id

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def answer(
    request: Request,
    ctx: RouterContext,
    body: Any,
    request_type: type[CompletionRequest] | type[ChatCompletionRequest],
    prepare: Callable[[Any, ServedModel], PreparedRequest],
) -> Response:
    parsed = request_type.parse(body)
    ctx.admission.check_room()  # a full router refuses before tokenizing anything
    if parsed.request_id is None:
        parsed.request_id = incoming_request_id(request.scope.get("headers", []))
    # tokenizing and the chat template take a while on long prompts: off the event loop
    prepared = await run_in_threadpool(prepare, parsed, ctx.served)
    if not ctx.pool.routable(WorkerRole.DECODE):
        ctx.metrics.requests_rejected.labels("no_worker").inc()
        raise no_worker_available("decode")
    run = CompletionRun(prepared, ctx.orchestrator, ctx.served, ctx.metrics, ctx.token_strings)
    try:  # a slot now, or after a bounded wait in the queue; 429 beyond it
        slot = await ctx.admission.admit(lambda: _client_left(request))
    except ClientGone:
        return Response(status_code=499)
    if parsed.stream:
        events = _released_at_end(slot, run.events())
        return _SlotStreamingResponse(slot, events, media_type="text/event-stream", headers=_SSE_HEADERS)
    try:
        result = await _unless_disconnected(request, run.response)
    finally:
        slot.release()
    if result is None:
        return Response(status_code=499)  # nobody is listening any more
    return JSONResponse(result)


class _SlotStreamingResponse(StreamingResponse):
    """Gives the admission slot back however the response ends, even when the stream
    never started (the client left before the first event)."""

    def __init__(self, slot: Slot, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._slot = slot

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._slot.release()


async def _released_at_end(slot: Slot, events: AsyncIterator[str]) -> AsyncIterator[str]:
    try:
        async for event in events:
            yield event
    finally:
        slot.release()  # as soon as the last event is out
        await events.aclose()


async def _client_left(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Callable[[], Awaitable[Any]]) -> Any:
    """`work()`'s result, or None if the client disconnects first (the work is then
    cancelled, which aborts its requests on the workers)."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    job = asyncio.ensure_future(work())
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({job, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not job.done():
            job.cancel()
            await asyncio.gather(job, return_exceptions=True)
    if job.cancelled():
        return None
    return job.result()
