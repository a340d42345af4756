"""What /v1/completions and /v1/chat/completions share: validate and tokenize the body,
refuse when no worker can take it or the router is full, then answer as a whole body or
as server-sent events. Torch-free."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from common.openai_api import ChatCompletionRequest, CompletionRequest, PreparedRequest, ServedModel
from router.completion_run import CompletionRun
from router.context import RouterContext
from router.errors import RetryLater, no_worker_available
from router.request_id import incoming_request_id
from router.worker_state import WorkerRole

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def answer(
    request: Request,
    ctx: RouterContext,
    body: Any,
    request_type: type[CompletionRequest] | type[ChatCompletionRequest],
    prepare: Callable[[Any, ServedModel], PreparedRequest],
) -> Response:
    parsed = request_type.parse(body)
    if parsed.request_id is None:
        parsed.request_id = incoming_request_id(request.scope.get("headers", []))
    # tokenizing and the chat template take a while on long prompts: off the event loop
    prepared = await run_in_threadpool(prepare, parsed, ctx.served)
    if not ctx.pool.routable(WorkerRole.DECODE):
        ctx.metrics.requests_rejected.labels("no_worker").inc()
        raise no_worker_available("decode")
    if ctx.in_flight >= ctx.config.max_concurrent_requests:
        ctx.metrics.requests_rejected.labels("overloaded").inc()
        raise RetryLater(
            f"the router is answering {ctx.in_flight} requests, its limit "
            "(--max-concurrent-requests); retry shortly"
        )
    run = CompletionRun(prepared, ctx.orchestrator, ctx.served, ctx.metrics, ctx.token_strings)
    if parsed.stream:
        return StreamingResponse(
            _counted(ctx, run.events()), media_type="text/event-stream", headers=_SSE_HEADERS
        )
    _enter(ctx)
    try:
        result = await _unless_disconnected(request, run.response)
    finally:
        _leave(ctx)
    if result is None:
        return Response(status_code=499)  # nobody is listening any more
    return JSONResponse(result)


def _enter(ctx: RouterContext) -> None:
    ctx.in_flight += 1
    ctx.metrics.requests_in_flight.labels(ctx.metrics.model_name).set(ctx.in_flight)


def _leave(ctx: RouterContext) -> None:
    ctx.in_flight -= 1
    ctx.metrics.requests_in_flight.labels(ctx.metrics.model_name).set(ctx.in_flight)


async def _counted(ctx: RouterContext, events: AsyncIterator[str]) -> AsyncIterator[str]:
    _enter(ctx)
    try:
        async for event in events:
            yield event
    finally:
        _leave(ctx)
        await events.aclose()


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
