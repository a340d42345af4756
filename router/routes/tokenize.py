"""POST /tokenize and /detokenize, with vLLM's request and response shapes. Torch-free."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.concurrency import run_in_threadpool

from common.openai_api import ChatCompletionRequest, bad_request, render_chat_prompt
from common.openai_api.errors import from_validation_error
from common.openai_api.json_body import json_type_name
from router.context import RouterContext
from router.dependencies import Context, JsonBody

router = APIRouter()


class TokenizeRequest(BaseModel):
    """Either `prompt` (text) or `messages` (rendered with the chat template first)."""

    model_config = ConfigDict(extra="allow", strict=True)  # JSON types only, as /openapi.json says
    model: str | None = None
    prompt: str | None = None
    messages: list[Any] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None  # rendered with the messages, as a chat request's
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # JSON types only, as /openapi.json says
    model: str | None = None
    tokens: list[int]


def _parse(model_type: type[BaseModel], body: Any) -> Any:
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {json_type_name(body)}")
    try:
        return model_type.model_validate(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


def _tokenize(request: TokenizeRequest, ctx: RouterContext) -> list[int]:
    served = ctx.served
    if (request.prompt is None) == (request.messages is None):
        raise bad_request("give either prompt (text) or messages (a chat), not both or neither", "prompt")
    if request.prompt is not None:
        add_special = True if request.add_special_tokens is None else request.add_special_tokens
        return served.tokenizer.encode(request.prompt, add_special_tokens=add_special)
    chat = ChatCompletionRequest.parse(
        {
            "messages": request.messages,
            "add_generation_prompt": request.add_generation_prompt,
            "continue_final_message": request.continue_final_message,
            "chat_template_kwargs": request.chat_template_kwargs,
            "tools": request.tools,
        }
    )
    chat.check_supported()
    text = render_chat_prompt(chat, served)
    return served.tokenizer.encode(text, add_special_tokens=bool(request.add_special_tokens))


@router.post("/tokenize")
async def tokenize(body: JsonBody, ctx: Context) -> dict[str, Any]:
    request: TokenizeRequest = _parse(TokenizeRequest, body)
    ctx.served.check_model(request.model)
    tokens = list(await run_in_threadpool(_tokenize, request, ctx))
    result: dict[str, Any] = {
        "count": len(tokens),
        "max_model_len": ctx.served.max_model_len,
        "tokens": tokens,
    }
    if request.return_token_strs:
        result["token_strs"] = ctx.served.tokenizer.convert_ids_to_tokens(tokens)
    return result


@router.post("/detokenize")
async def detokenize(body: JsonBody, ctx: Context) -> dict[str, str]:
    request: DetokenizeRequest = _parse(DetokenizeRequest, body)
    ctx.served.check_model(request.model)
    vocab = ctx.served.vocab_size
    bad = next((t for t in request.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise bad_request(f"tokens: token id {bad} is outside the vocabulary [0, {vocab})", "tokens")
    return {"prompt": ctx.served.tokenizer.decode(request.tokens)}
