"""Every failure the router answers, as the OpenAI error body.

`{"error": {"message", "type", "param", "code"}}` with the right status: OpenAIError
raised anywhere in a handler, FastAPI's own HTTP errors (unknown path, wrong method),
and, for a bug, a 500 that says so while the server keeps serving. A 503 from
`RetryLater` carries Retry-After. Torch-free.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from common.openai_api import OpenAIError
from common.openai_api.errors import from_validation_error

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1


class RetryLater(OpenAIError):
    """Overloaded, or no worker can take the request now: 503 with Retry-After."""

    def __init__(self, message: str, retry_after_s: int = RETRY_AFTER_S) -> None:
        super().__init__(503, message)
        self.retry_after_s = retry_after_s


def no_worker_available(role: str) -> RetryLater:
    return RetryLater(
        f"no healthy {role} worker is available right now; retry shortly "
        "(the router's /health lists the workers and their state)"
    )


def error_response(error: OpenAIError, headers: dict[str, str] | None = None) -> JSONResponse:
    headers = dict(headers or {})
    if isinstance(error, RetryLater):
        headers["Retry-After"] = str(error.retry_after_s)
    return JSONResponse(error.to_body(), status_code=error.status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(from_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}; see /v1/models, /v1/completions, /v1/chat/completions"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return error_response(OpenAIError(exc.status_code, message), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(
            OpenAIError(
                500, f"internal error in the router: {type(exc).__name__}: {exc}", type="InternalServerError"
            )
        )
