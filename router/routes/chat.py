"""POST /v1/chat/completions. Torch-free."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from common.openai_api import ChatCompletionRequest, prepare_chat
from router.dependencies import Context, JsonBody, require_api_key
from router.routes.generation import answer

router = APIRouter(dependencies=[Depends(require_api_key)])


@router.post("/v1/chat/completions")
async def create_chat_completion(request: Request, body: JsonBody, ctx: Context) -> Response:
    return await answer(request, ctx, body, ChatCompletionRequest, prepare_chat)
