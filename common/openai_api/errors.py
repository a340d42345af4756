"""The OpenAI error: one exception type that knows its HTTP status and its JSON body.

Everything that rejects a request (validation, an unknown model, a prompt longer
than the context) raises OpenAIError; the router turns it into an HTTP response and
`pdserve run-batch` into a batch output line, both with the same body.
"""

from __future__ import annotations

from typing import Any

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    413: "RequestEntityTooLargeError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class OpenAIError(Exception):
    """A request the API answers with an error body instead of a completion."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type or _TYPES.get(status, "BadRequestError")

    def to_body(self) -> dict[str, Any]:
        """`{"error": {"message", "type", "param", "code"}}`, as the OpenAI API answers."""
        return {
            "error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}
        }

    def __repr__(self) -> str:
        return f"OpenAIError({self.status}, {self.message!r}, param={self.param!r})"


def bad_request(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param)


def model_not_found(model: str) -> OpenAIError:
    return OpenAIError(404, f"The model `{model}` does not exist.", "model")


def from_validation_error(exc: Any) -> OpenAIError:
    """A 400 from a pydantic ValidationError, naming the first offending field."""
    errors = exc.errors()
    if not errors:
        return bad_request(str(exc))
    first = errors[0]
    location = [str(part) for part in first.get("loc", ())]
    param = ".".join(location) or None
    if first.get("type") == "value_error" and "error" in first.get("ctx", {}):
        message = str(first["ctx"]["error"])  # our own check's words, without pydantic's prefix
    else:
        message = first.get("msg", "invalid value")
    where = f"{param}: " if param else ""
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return bad_request(f"{where}{message}{more}", param)
