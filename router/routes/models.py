"""GET /v1/models: the served model names. Torch-free."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from common.openai_api import model_not_found
from router.context import RouterContext
from router.dependencies import Context, require_api_key

router = APIRouter(dependencies=[Depends(require_api_key)])


def _card(ctx: RouterContext, name: str) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": ctx.created,
        "owned_by": "pdserve",
        "root": ctx.served.name,
        "parent": None,
        "max_model_len": ctx.served.max_model_len,
    }


@router.get("/v1/models")
async def list_models(ctx: Context) -> dict[str, Any]:
    return {"object": "list", "data": [_card(ctx, name) for name in ctx.served.names]}


@router.get("/v1/models/{model:path}")
async def get_model(model: str, ctx: Context) -> dict[str, Any]:
    if model not in ctx.served.names:
        raise model_not_found(model)
    return _card(ctx, model)
