"""Send a benchmark's requests on schedule and collect their results.

Each request becomes a task at its send time; with `max_concurrency` it then waits for
one of that many slots, and its clock starts once it has one (so the figures measure
the server, not the client's queue). Torch-free.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import httpx

from pdserve.bench.serve.client import ApiTarget, send_request
from pdserve.bench.serve.datasets import SampleRequest
from pdserve.bench.serve.metrics import RequestResult
from pdserve.bench.serve.progress import ProgressBar

_CONNECT_TIMEOUT_S = 30.0


async def run_requests(
    target: ApiTarget,
    requests: Sequence[SampleRequest],
    send_times: Sequence[float],
    max_concurrency: int | None = None,
    progress: ProgressBar | None = None,
) -> tuple[list[RequestResult], float]:
    """Every request's result, in the order given, and the run's wall time in seconds."""
    limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    async with httpx.AsyncClient(
        timeout=httpx.Timeout(None, connect=_CONNECT_TIMEOUT_S), limits=limits, trust_env=False
    ) as client:
        start = time.perf_counter()

        async def one(request: SampleRequest, send_at: float) -> RequestResult:
            delay = start + send_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if slots is None:
                result = await send_request(client, target, request)
            else:
                async with slots:
                    result = await send_request(client, target, request)
            if progress is not None:
                progress.update()
            return result

        results = await asyncio.gather(*(one(r, t) for r, t in zip(requests, send_times, strict=True)))
        duration = time.perf_counter() - start
    return list(results), duration
