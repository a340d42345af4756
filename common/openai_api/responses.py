"""Whole (non-streaming) response bodies, shaped as the OpenAI API answers.

`completion_response` gives a `text_completion` object and `chat_completion_response`
a `chat.completion` one, from a PreparedRequest and the finished RequestText of each
of its choices (same order as `prepared.sequences`). A chat choice's message is its
output as the request's reader sees it (chat_output.py): reasoning_content, content
and tool_calls. The logprob formatters are shared with the streaming chunks.
"""

from __future__ import annotations

from typing import Any

from common.openai_api.prepare import PreparedRequest
from common.output_processor import LogprobEntry, RequestText

# JSON has no -inf; the OpenAI API writes this for "very unlikely"
_MIN_LOGPROB = -9999.0


def completion_response(
    prepared: PreparedRequest, outputs: list[RequestText], prompt_tokens_details: bool = False
) -> dict[str, Any]:
    """prompt_tokens_details: add usage.prompt_tokens_details.cached_tokens (--enable-prompt-tokens-details)."""
    request = prepared.request
    choices = []
    for spec, output in zip(prepared.sequences, outputs, strict=True):
        prompt = prepared.prompts[spec.prompt_index]
        echoed = prompt.text if request.echo and prompt.text is not None else ""
        choice: dict[str, Any] = {
            "index": spec.index,
            "text": echoed + output.text,
            "logprobs": completion_logprobs(output.logprobs, len(echoed))
            if output.logprobs is not None
            else None,
            "finish_reason": output.finish_reason,
            "stop_reason": output.stop_reason,
            "prompt_logprobs": None,
        }
        if request.return_token_ids:
            choice["prompt_token_ids"] = prompt.token_ids
            choice["token_ids"] = output.token_ids
        choices.append(choice)
    return {
        "id": prepared.id,
        "object": "text_completion",
        "created": prepared.created,
        "model": prepared.model,
        "choices": choices,
        "usage": usage(prepared, outputs, prompt_tokens_details),
        "system_fingerprint": None,
    }


def chat_completion_response(
    prepared: PreparedRequest,
    outputs: list[RequestText],
    prompt_tokens_details: bool = False,
    role: str = "assistant",
) -> dict[str, Any]:
    request = prepared.request
    choices = []
    for spec, output in zip(prepared.sequences, outputs, strict=True):
        message, finish_reason = chat_message(prepared, output, role)
        choice: dict[str, Any] = {
            "index": spec.index,
            "message": message,
            "logprobs": chat_logprobs(output.logprobs) if output.logprobs is not None else None,
            "finish_reason": finish_reason,
            "stop_reason": output.stop_reason,
        }
        if request.return_token_ids:
            choice["token_ids"] = output.token_ids
        choices.append(choice)
    body: dict[str, Any] = {
        "id": prepared.id,
        "object": "chat.completion",
        "created": prepared.created,
        "model": prepared.model,
        "choices": choices,
        "usage": usage(prepared, outputs, prompt_tokens_details),
        "system_fingerprint": None,
        "prompt_logprobs": None,
    }
    if request.return_token_ids:
        body["prompt_token_ids"] = prepared.prompts[0].token_ids
    return body


def chat_message(
    prepared: PreparedRequest, output: RequestText, role: str = "assistant"
) -> tuple[dict[str, Any], str | None]:
    """One finished choice's message, and its finish_reason ("tool_calls" when it called tools)."""
    message: dict[str, Any] = {
        "role": role,
        "content": output.text,
        "refusal": None,
        "tool_calls": [],
        "reasoning_content": None,
    }
    if prepared.reader is None:
        return message, output.finish_reason
    parts, finish_reason = prepared.reader.read(output.text, output.finish_reason)
    message["content"] = parts.content
    message["reasoning_content"] = parts.reasoning_content
    message["tool_calls"] = [call.to_dict() for call in parts.tool_calls]
    return message, finish_reason


def usage(prepared: PreparedRequest, outputs: list[RequestText], prompt_tokens_details: bool = False) -> dict:
    """Each prompt counts once, however many samples it has; every sample's tokens count."""
    prompt_tokens = sum(len(prompt.token_ids) for prompt in prepared.prompts)
    completion_tokens = sum(len(output.token_ids) for output in outputs)
    body: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if prompt_tokens_details:
        first_of_each_prompt = {}
        for spec, output in zip(prepared.sequences, outputs, strict=True):
            first_of_each_prompt.setdefault(spec.prompt_index, output.num_cached_tokens)
        body["prompt_tokens_details"] = {"cached_tokens": sum(first_of_each_prompt.values())}
    return body


def completion_logprobs(entries: list[LogprobEntry], text_offset: int = 0) -> dict[str, Any]:
    """The legacy completions format: parallel lists, top_logprobs as {token: logprob} maps.

    As vLLM does, each position's map holds the k most likely tokens and the sampled one.
    """
    offsets, token_logprobs, tokens, top_logprobs = [], [], [], []
    for entry in entries:
        offsets.append(text_offset)
        text_offset += len(entry.token)
        tokens.append(entry.token)
        token_logprobs.append(_json_logprob(entry.logprob))
        top = {token: _json_logprob(logprob) for _, token, logprob in entry.top}
        top.setdefault(entry.token, _json_logprob(entry.logprob))
        top_logprobs.append(top)
    return {
        "text_offset": offsets,
        "token_logprobs": token_logprobs,
        "tokens": tokens,
        "top_logprobs": top_logprobs,
    }


def chat_logprobs(entries: list[LogprobEntry]) -> dict[str, Any]:
    """The chat format: {"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]}."""
    return {
        "content": [
            {
                **_token_logprob(entry.token, entry.logprob),
                "top_logprobs": [_token_logprob(token, logprob) for _, token, logprob in entry.top],
            }
            for entry in entries
        ]
    }


def _token_logprob(token: str, logprob: float) -> dict[str, Any]:
    return {
        "token": token,
        "logprob": _json_logprob(logprob),
        "bytes": list(token.encode("utf-8", errors="replace")),
    }


def _json_logprob(logprob: float) -> float:
    return max(logprob, _MIN_LOGPROB)
