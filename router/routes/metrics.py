"""GET /metrics: Prometheus text. Torch-free."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from router.dependencies import Context
from router.metrics import CONTENT_TYPE

router = APIRouter()


@router.get("/metrics")
async def metrics(ctx: Context) -> Response:
    return Response(ctx.metrics.render(), media_type=CONTENT_TYPE)
