"""Streaming chunks and their server-sent-event framing.

One chunk per TextDelta of one choice: `text_completion` objects for completions,
`chat.completion.chunk` objects for chat (the first chunk of each choice carries the
role; a chat request with a reader, chat_output.py, streams what its choice's stream
made of the delta: reasoning_content, content, tool_calls pieces). With `stream_options.include_usage`, every chunk has `"usage": null` and
`usage_chunk` (no choices, the whole usage) goes just before `data: [DONE]`.
"""

from __future__ import annotations

import json
from typing import Any

from common.openai_api.chat_output import ChatDelta
from common.openai_api.errors import OpenAIError
from common.openai_api.prepare import PreparedRequest
from common.openai_api.responses import chat_logprobs, completion_logprobs, usage
from common.output_processor import RequestText, TextDelta

SSE_DONE = "data: [DONE]\n\n"


def completion_chunk(
    prepared: PreparedRequest, index: int, delta: TextDelta, text_offset: int = 0, text_prefix: str = ""
) -> dict[str, Any]:
    """One choice's delta; text_offset is how much text this choice already sent (for logprobs),
    text_prefix what goes before the delta's text (the echoed prompt in the first chunk)."""
    choice: dict[str, Any] = {
        "index": index,
        "text": text_prefix + delta.text,
        "logprobs": completion_logprobs(delta.logprobs, text_offset + len(text_prefix))
        if delta.logprobs is not None
        else None,
        "finish_reason": delta.finish_reason,
        "stop_reason": delta.stop_reason,
    }
    if prepared.request.return_token_ids:
        choice["token_ids"] = delta.token_ids
    return _chunk(prepared, "text_completion", [choice])


def chat_chunk(
    prepared: PreparedRequest,
    index: int,
    delta: TextDelta,
    first: bool = False,
    message: ChatDelta | None = None,
    finish_reason: str | None = None,
    role: str = "assistant",
) -> dict[str, Any]:
    """One choice's delta; `first` adds the role (--response-role), as the first chunk of a
    choice must.

    `message` is what the choice's ChoiceStream made of the delta, and `finish_reason` the
    one it decided (ChoiceStream.finish_reason); without them the delta's text is content.
    """
    body = {"content": delta.text} if message is None else message.to_dict()
    if message is None:
        finish_reason = delta.finish_reason
    choice: dict[str, Any] = {
        "index": index,
        "delta": {"role": role, **body} if first else body,
        "logprobs": chat_logprobs(delta.logprobs) if delta.logprobs is not None else None,
        "finish_reason": finish_reason,
        "stop_reason": delta.stop_reason,
    }
    if prepared.request.return_token_ids:
        choice["token_ids"] = delta.token_ids
    return _chunk(prepared, "chat.completion.chunk", [choice])


def usage_chunk(
    prepared: PreparedRequest, outputs: list[RequestText], prompt_tokens_details: bool = False
) -> dict[str, Any]:
    """The last chunk before [DONE] when include_usage is set: no choices, the whole usage."""
    chunk = _chunk(prepared, _chunk_object(prepared), [])
    chunk["usage"] = usage(prepared, outputs, prompt_tokens_details)
    return chunk


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def sse_error(error: OpenAIError) -> str:
    """An error in the middle of a stream; the stream then ends with SSE_DONE."""
    return sse(error.to_body())


def _chunk_object(prepared: PreparedRequest) -> str:
    return "chat.completion.chunk" if prepared.kind == "chat" else "text_completion"


def _chunk(prepared: PreparedRequest, object_name: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": prepared.id,
        "object": object_name,
        "created": prepared.created,
        "model": prepared.model,
        "choices": choices,
    }
    options = prepared.request.stream_options
    if options is not None and options.include_usage:
        chunk["usage"] = None
    return chunk
