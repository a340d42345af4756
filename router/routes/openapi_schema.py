"""The router's OpenAPI description (/openapi.json): request bodies, answers and errors.

The generation, tokenize and detokenize routes read their body as raw JSON and validate
it themselves (router.dependencies.json_body), so FastAPI cannot see its shape. This
module writes it in from the request models, documents each route's successful answer
and every error status the router can give with the OpenAI error body, and drops
FastAPI's 422: a body that fails validation is a 400 here. Schemathesis reads this
description (tests/router/test_openapi_fuzz.py), so it must stay exact. Torch-free.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from common.openai_api import ChatCompletionRequest, CompletionRequest
from router.config import RouterConfig
from router.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from router.routes.tokenize import DetokenizeRequest, TokenizeRequest

_REF = "#/components/schemas/{model}"

# -- the answers' shapes -------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: int


class ErrorResponse(BaseModel):
    """Every error the router answers, whatever its status."""

    error: ErrorDetail


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None  # --enable-prompt-tokens-details


FinishReason = Literal["stop", "length", "abort", "tool_calls"] | None
StopReason = int | str | None  # the stop token id, or the stop string, that ended the choice


class CompletionLogprobs(BaseModel):
    text_offset: list[int]
    token_logprobs: list[float]
    tokens: list[str]
    top_logprobs: list[dict[str, float]]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason
    stop_reason: StopReason
    prompt_logprobs: None = None
    token_ids: list[int] | None = None  # with return_token_ids
    prompt_token_ids: list[int] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TokenLogprob):
    top_logprobs: list[TokenLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(BaseModel):
    role: str
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCall] = []
    reasoning_content: str | None = None  # with --reasoning-parser


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason
    stop_reason: StopReason
    token_ids: list[int] | None = None  # with return_token_ids


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None
    prompt_logprobs: None = None
    prompt_token_ids: list[int] | None = None  # with return_token_ids


class ModelPermission(BaseModel):
    id: str
    object: Literal["model_permission"]
    created: int
    allow_create_engine: bool
    allow_sampling: bool
    allow_logprobs: bool
    allow_search_indices: bool
    allow_view: bool
    allow_fine_tuning: bool
    organization: str
    group: str | None
    is_blocking: bool


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str  # a LoRA adapter's: its folder
    parent: str | None  # a LoRA adapter's: the base model it was made for
    max_model_len: int | None  # None for a LoRA adapter, as vLLM lists it
    permission: list[ModelPermission]


class LoadLoRAAdapterRequest(BaseModel):
    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(BaseModel):
    lora_name: str | None = None
    lora_int_id: int | None = None


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class WorkerHealth(BaseModel):
    worker: str
    role: str
    healthy: bool
    active_requests: int
    kv_cache_usage: float


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    workers: list[WorkerHealth]
    message: str | None = None  # which role has no healthy worker


class Version(BaseModel):
    version: str


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None  # with return_token_strs


class DetokenizeResponse(BaseModel):
    prompt: str


# one server-sent event, as a client's SSE parser reads it
_SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "type": "string",
            "description": "a JSON chunk (the chunk object, or an error body {'error': ...} when the "
            "request fails midway), and last the text [DONE]",
        },
        "event": {"type": "string"},
    },
}

# -- what each route takes and answers ------------------------------------------------------

_REQUEST_BODIES: dict[tuple[str, str], type[BaseModel]] = {
    ("/v1/completions", "post"): CompletionRequest,
    ("/v1/chat/completions", "post"): ChatCompletionRequest,
    ("/tokenize", "post"): TokenizeRequest,
    ("/detokenize", "post"): DetokenizeRequest,
    ("/v1/load_lora_adapter", "post"): LoadLoRAAdapterRequest,
    ("/v1/unload_lora_adapter", "post"): UnloadLoRAAdapterRequest,
}
_TEXT = {"text/plain": {"type": "string"}}

# path -> {status: answer}; an answer is a model (JSON), a {media type: schema} map, or
# None for the OpenAI error body
_ANSWERS: dict[str, dict[int, Any]] = {
    "/v1/completions": {
        200: {"application/json": CompletionResponse, "text/event-stream": _SSE_EVENT},
        400: None, 404: None, 429: None, 503: None,
    },
    "/v1/chat/completions": {
        200: {"application/json": ChatCompletionResponse, "text/event-stream": _SSE_EVENT},
        400: None, 404: None, 429: None, 503: None,
    },
    "/v1/models": {200: ModelList},
    "/v1/models/{model}": {200: ModelCard, 404: None},
    "/health": {200: Health, 503: Health},
    "/ping": {200: Health, 503: Health},
    "/version": {200: Version},
    "/metrics": {200: {METRICS_CONTENT_TYPE.split(";")[0]: {"type": "string"}}},
    "/tokenize": {200: TokenizeResponse, 400: None, 404: None},
    "/detokenize": {200: DetokenizeResponse, 400: None, 404: None},
    # with --allow-runtime-lora-updating only; 200: "Success: LoRA adapter '<name>' added successfully."
    "/v1/load_lora_adapter": {200: _TEXT, 400: None, 404: None, 500: None, 503: None},
    "/v1/unload_lora_adapter": {200: _TEXT, 400: None, 404: None},
}  # fmt: skip

_DESCRIPTIONS = {
    200: "Success",
    400: "The request is malformed or asks for what the model cannot do; the message says which field",
    401: "--api-key is set and the request lacks 'Authorization: Bearer <key>'",
    404: "No such model (or the route is switched off); for a LoRA adapter, none at its path or none by that name",
    413: "The body is larger than --h11-max-incomplete-event-size",
    431: "More header lines than --h11-max-header-count, or a header block larger than "
    "--h11-max-incomplete-event-size",
    429: "The router is at --max-concurrent-requests and its queue (--max-queued-requests) is full, or "
    "the request waited --max-queue-wait in it; retry after Retry-After",
    500: "A worker failed while loading the adapter; the message says how",
    503: "No healthy worker; retry after Retry-After",
}
_RETRY_AFTER = {
    "Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "string"}}
}


def install_openapi(app: FastAPI, config: RouterConfig) -> None:
    """Make `app.openapi()` (and so /openapi.json) this module's description of the
    routes as `config` sets them up (which need a key, which are switched off)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app, config)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _access_answers(path: str, config: RouterConfig) -> dict[int, None]:
    """The 401 and 404 that router.dependencies.endpoint_access answers on `path`."""
    setting = {"/metrics": "metrics_access", "/health": "health_access", "/ping": "health_access"}.get(path)
    if setting is not None:
        access = getattr(config, setting, "public")
        keyed = access == "api-key"
    else:
        access = "public"
        keyed = path.startswith("/v1/") or path in ("/tokenize", "/detokenize")
    answers: dict[int, None] = {}
    if keyed and config.api_key:
        answers[401] = None
    if access == "disabled":
        answers[404] = None
    return answers


def build_openapi(app: FastAPI, config: RouterConfig) -> dict[str, Any]:
    schema = get_openapi(title=app.title, version=app.version, description=_DOC, routes=app.routes)
    components: dict[str, Any] = schema.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    error_ref = _component(components, ErrorResponse)
    limits = {413: None, 431: None}  # router.http_limits, before any route
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            model = _REQUEST_BODIES.get((path, method))
            if model is not None:
                operation["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {"schema": _component(components, model)}},
                }
            answers = {**_ANSWERS.get(path, {}), **limits, **_access_answers(path, config)}
            operation["responses"] = {
                str(status): _response(status, answer, components, error_ref)
                for status, answer in sorted(answers.items())
            }
    return schema


def _response(
    status: int, answer: Any, components: dict[str, Any], error_ref: dict[str, str]
) -> dict[str, Any]:
    if answer is None:
        content = {"application/json": {"schema": error_ref}}
    elif isinstance(answer, dict):
        content = {media: {"schema": _schema_of(item, components)} for media, item in answer.items()}
    else:
        content = {"application/json": {"schema": _schema_of(answer, components)}}
    response: dict[str, Any] = {"description": _DESCRIPTIONS[status], "content": content}
    if status in (429, 503):
        response["headers"] = _RETRY_AFTER
    return response


def _schema_of(item: Any, components: dict[str, Any]) -> dict[str, Any]:
    return _component(components, item) if isinstance(item, type) else item


def _component(components: dict[str, Any], model: type[BaseModel]) -> dict[str, str]:
    """Put `model` (and the models it refers to) under components; a $ref to it."""
    schema = model.model_json_schema(ref_template=_REF)
    components.update(schema.pop("$defs", {}))
    components[model.__name__] = schema
    return {"$ref": _REF.format(model=model.__name__)}


_DOC = (
    "The OpenAI-compatible front door of a pdserve cluster. Every error is answered with "
    '`{"error": {"message", "type", "param", "code"}}`; a stream that fails midway sends that '
    "body as an event, then `data: [DONE]`. Unknown request fields are accepted and ignored."
)
