"""GET /health, /ping and /version. Torch-free."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from common.protocol import WorkerRole
from router.dependencies import Context

router = APIRouter()


def router_version() -> str:
    try:
        return version("pdserve")
    except PackageNotFoundError:
        return "unknown (not installed; pip install -e .)"


@router.get("/health")
async def health(ctx: Context) -> JSONResponse:
    """200 when every role the router was given has a healthy worker, else 503.

    A deployment without prefill workers needs only decode workers; one with them needs
    both (without a healthy prefill worker it still answers, prefilling on decode)."""
    pool = ctx.pool
    missing = []
    if pool.num_healthy(WorkerRole.DECODE) == 0:
        missing.append("decode")
    if pool.clients(WorkerRole.PREFILL) and pool.num_healthy(WorkerRole.PREFILL) == 0:
        missing.append("prefill")
    workers: list[dict[str, Any]] = [
        {
            "worker": client.state.worker_id,
            "role": client.state.role.value,
            "healthy": client.state.healthy,
            "active_requests": client.state.num_active_requests,
            "kv_cache_usage": client.state.kv_usage,
        }
        for client in pool.clients()
    ]
    body: dict[str, Any] = {"status": "ok" if not missing else "unavailable", "workers": workers}
    if missing:
        body["message"] = f"no healthy {' or '.join(missing)} worker"
        return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})
    return JSONResponse(body)


@router.get("/ping")
@router.post("/ping")  # a route per method: each its own OpenAPI operation id
async def ping(ctx: Context) -> JSONResponse:
    return await health(ctx)


@router.get("/version")
async def get_version() -> dict[str, str]:
    return {"version": router_version()}
