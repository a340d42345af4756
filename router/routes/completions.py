"""POST /v1/completions. Torch-free."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from common.openai_api import CompletionRequest, prepare_completion
from router.dependencies import Context, JsonBody, require_api_key
from router.routes.generation import answer

router = APIRouter(dependencies=[Depends(require_api_key)])


@router.post("/v1/completions")
async def create_completion(request: Request, body: JsonBody, ctx: Context) -> Response:
    return await answer(request, ctx, body, CompletionRequest, prepare_completion)
