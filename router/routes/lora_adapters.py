"""POST /v1/load_lora_adapter and /v1/unload_lora_adapter: vLLM's runtime LoRA endpoints,
mounted only with --allow-runtime-lora-updating (or $VLLM_ALLOW_RUNTIME_LORA_UPDATING),
so without it they answer 404 as vLLM's unmounted routes do. They answer as vLLM does: a
text body "Success: ..." with 200, or the OpenAI error body. The work is in
router/lora_updates.py. Torch-free.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from common.openai_api import OpenAIError
from router.dependencies import Context, JsonBody, require_api_key
from router.lora_updates import INVALID_USER_INPUT

router = APIRouter(dependencies=[Depends(require_api_key)])


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(body: JsonBody, ctx: Context) -> Response:
    name, path = _string(body, "lora_name"), _string(body, "lora_path")
    if not name or not path:
        raise OpenAIError(400, "Both 'lora_name' and 'lora_path' must be provided.", type=INVALID_USER_INPUT)
    if not ctx.config.lora.enable_lora:
        raise OpenAIError(
            400, "LoRA is not enabled on this server; start it (and its workers) with --enable-lora"
        )
    await ctx.lora_updates.load(name, path)
    return _text(f"Success: LoRA adapter '{name}' added successfully.")


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(body: JsonBody, ctx: Context) -> Response:
    name = _string(body, "lora_name")
    lora_id = body.get("lora_int_id") if isinstance(body, dict) else None
    if lora_id is not None and (isinstance(lora_id, bool) or not isinstance(lora_id, int)):
        raise OpenAIError(400, "lora_int_id must be an integer", "lora_int_id")
    if not name and lora_id is None:
        raise OpenAIError(
            400, "either 'lora_name' and 'lora_int_id' needs to be provided.", type=INVALID_USER_INPUT
        )
    name = await ctx.lora_updates.unload(name or None, lora_id)
    return _text(f"Success: LoRA adapter '{name}' removed successfully.")


def _string(body: Any, key: str) -> str | None:
    if not isinstance(body, dict):
        raise OpenAIError(400, "the body must be a JSON object")
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise OpenAIError(400, f"{key} must be a string", key)
    return value


def _text(message: str) -> Response:
    return Response(message, media_type="text/plain")
