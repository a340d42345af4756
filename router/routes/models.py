"""GET /v1/models: the served model names, then the LoRA adapters served (each with its
folder as root and its base model as parent, as vLLM lists them). Torch-free."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from common.openai_api import model_not_found
from router.context import RouterContext
from router.dependencies import Context, require_api_key
from router.lora_adapters import model_card, model_permission

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
        "permission": [model_permission(ctx.created)],
    }


def _adapter_cards(ctx: RouterContext) -> dict[str, dict[str, Any]]:
    return {
        adapter.lora.name: model_card(adapter, ctx.served.name, ctx.created)
        for adapter in ctx.adapters.adapters()
    }


@router.get("/v1/models")
async def list_models(ctx: Context) -> dict[str, Any]:
    cards = [_card(ctx, name) for name in ctx.served.names]
    return {"object": "list", "data": cards + list(_adapter_cards(ctx).values())}


@router.get("/v1/models/{model:path}")
async def get_model(model: str, ctx: Context) -> dict[str, Any]:
    if model in ctx.served.names:
        return _card(ctx, model)
    card = _adapter_cards(ctx).get(model)
    if card is None:
        raise model_not_found(model)
    return card
