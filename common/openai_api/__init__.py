"""The OpenAI API's request and response shapes, shared by the router and `pdserve run-batch`.

Torch-free. A body goes `CompletionRequest.parse` / `ChatCompletionRequest.parse`
-> `prepare_completion` / `prepare_chat` (tokenized, validated against the served
model, one SequenceSpec per choice) -> the engine -> the output processor ->
`completion_response` / `chat_completion_response` or streaming chunks.
"""

from common.openai_api.errors import OpenAIError, bad_request, model_not_found
from common.openai_api.prepare import (
    PreparedRequest,
    PromptInput,
    SequenceSpec,
    prepare_chat,
    prepare_completion,
    render_chat_prompt,
)
from common.openai_api.requests import ChatCompletionRequest, CompletionRequest, StreamOptions
from common.openai_api.responses import chat_completion_response, completion_response, usage
from common.openai_api.served_model import ServedModel
from common.openai_api.streaming import SSE_DONE, chat_chunk, completion_chunk, sse, sse_error, usage_chunk

__all__ = [
    "SSE_DONE",
    "ChatCompletionRequest",
    "CompletionRequest",
    "OpenAIError",
    "PreparedRequest",
    "PromptInput",
    "SequenceSpec",
    "ServedModel",
    "StreamOptions",
    "bad_request",
    "chat_chunk",
    "chat_completion_response",
    "completion_chunk",
    "completion_response",
    "model_not_found",
    "prepare_chat",
    "prepare_completion",
    "render_chat_prompt",
    "sse",
    "sse_error",
    "usage",
    "usage_chunk",
]
