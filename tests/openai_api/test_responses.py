"""Response bodies and streaming chunks, checked against the `openai` client's own types."""

from __future__ import annotations

import json
import math

from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from common.engine.outputs import RequestOutput, TokenLogprobs
from common.openai_api import (
    SSE_DONE,
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIError,
    chat_chunk,
    chat_completion_response,
    completion_chunk,
    completion_response,
    prepare_chat,
    prepare_completion,
    sse,
    sse_error,
    usage_chunk,
)
from common.output_processor import OutputProcessor


def finish(tokenizer, prepared, texts, logprob=-0.25):
    """Feed the engine's side: choice i generates texts[i], one token a step, ending on length."""
    processor = OutputProcessor(tokenizer)
    states, deltas = [], []
    for spec, text in zip(prepared.sequences, texts, strict=True):
        states.append(processor.add_request(spec.request_id, spec.prompt_token_ids, prepared.options))
        ids = tokenizer.encode(text)
        for i, token_id in enumerate(ids):
            last = i == len(ids) - 1
            lps = [TokenLogprobs(token_id, logprob, 1, [(token_id, logprob), (0, -math.inf)])]
            out = RequestOutput(
                spec.request_id, [token_id], lps, last, "length" if last else None, None, 3, 0
            )
            deltas += [(spec.index, d) for d in processor.process_outputs([out])[0]]
    return states, deltas


def test_a_completion_body_is_an_openai_completion(served, tokenizer):
    prepared = prepare_completion(
        CompletionRequest.parse({"prompt": ["Say hi", "Say bye"], "n": 2, "max_tokens": 5}), served
    )
    states, _ = finish(tokenizer, prepared, [" hi", " hi there", " bye", " bye now"])
    body = completion_response(prepared, states)
    parsed = Completion.model_validate(body)
    assert parsed.object == "text_completion" and parsed.model == served.names[0]
    assert [c.text for c in parsed.choices] == [" hi", " hi there", " bye", " bye now"]
    assert [c.index for c in parsed.choices] == [0, 1, 2, 3]
    assert all(c.finish_reason == "length" for c in parsed.choices)
    prompt_tokens = len(tokenizer.encode("Say hi")) + len(tokenizer.encode("Say bye"))
    completion_tokens = sum(len(tokenizer.encode(t)) for t in [" hi", " hi there", " bye", " bye now"])
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    json.dumps(body, allow_nan=False)


def test_echo_puts_the_prompt_before_the_completion(served, tokenizer):
    prepared = prepare_completion(CompletionRequest.parse({"prompt": "Say hi", "echo": True}), served)
    states, _ = finish(tokenizer, prepared, [" hi"])
    assert completion_response(prepared, states)["choices"][0]["text"] == "Say hi hi"


def test_completion_logprobs_use_the_legacy_format(served, tokenizer):
    prepared = prepare_completion(CompletionRequest.parse({"prompt": "x", "logprobs": 1}), served)
    states, _ = finish(tokenizer, prepared, [" Hello world"])
    logprobs = completion_response(prepared, states)["choices"][0]["logprobs"]
    assert logprobs["tokens"] == [" Hello", " world"]
    assert logprobs["token_logprobs"] == [-0.25, -0.25]
    assert logprobs["text_offset"] == [0, len(" Hello")]
    # the k most likely with the sampled token; -inf, which JSON lacks, becomes -9999
    first_top = logprobs["top_logprobs"][0]
    assert first_top[" Hello"] == -0.25 and -9999.0 in first_top.values()


def test_return_token_ids_adds_prompt_and_output_ids(served, tokenizer):
    prepared = prepare_completion(CompletionRequest.parse({"prompt": "Hi", "return_token_ids": True}), served)
    states, _ = finish(tokenizer, prepared, [" there"])
    choice = completion_response(prepared, states)["choices"][0]
    assert choice["prompt_token_ids"] == tokenizer.encode("Hi") and choice["token_ids"] == tokenizer.encode(
        " there"
    )


def test_a_chat_body_is_an_openai_chat_completion(served, tokenizer):
    request = ChatCompletionRequest.parse(
        {
            "messages": [{"role": "user", "content": "hi"}],
            "logprobs": True,
            "top_logprobs": 1,
            "return_token_ids": True,
        }
    )
    prepared = prepare_chat(request, served)
    states, _ = finish(tokenizer, prepared, ["Hello! How can I help?"])
    body = chat_completion_response(prepared, states)
    parsed = ChatCompletion.model_validate(body)
    assert parsed.object == "chat.completion" and parsed.id.startswith("chatcmpl-")
    message = parsed.choices[0].message
    assert message.role == "assistant" and message.content == "Hello! How can I help?"
    content = parsed.choices[0].logprobs.content
    assert "".join(c.token for c in content) == "Hello! How can I help?"
    assert (
        content[0].bytes == list(content[0].token.encode())
        and content[0].top_logprobs[0].token == content[0].token
    )
    assert body["prompt_token_ids"] == prepared.prompts[0].token_ids
    assert body["choices"][0]["token_ids"] == states[0].token_ids
    assert body["usage"]["prompt_tokens"] == len(prepared.prompts[0].token_ids)


def test_chat_chunks_are_openai_chunks_and_the_first_carries_the_role(served, tokenizer):
    request = ChatCompletionRequest.parse(
        {
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    prepared = prepare_chat(request, served)
    states, deltas = finish(tokenizer, prepared, ["Hello there"])
    chunks = [chat_chunk(prepared, index, delta, first=i == 0) for i, (index, delta) in enumerate(deltas)]
    parsed = [ChatCompletionChunk.model_validate(c) for c in chunks]
    assert parsed[0].choices[0].delta.role == "assistant"
    assert all(p.choices[0].delta.role is None for p in parsed[1:])
    assert "".join(p.choices[0].delta.content for p in parsed) == "Hello there"
    assert parsed[-1].choices[0].finish_reason == "length"
    assert all("usage" in c and c["usage"] is None for c in chunks)
    last = usage_chunk(prepared, states)
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == len(states[0].token_ids)
    assert ChatCompletionChunk.model_validate(last).usage.total_tokens == last["usage"]["total_tokens"]


def test_completion_chunks_are_text_completion_objects(served, tokenizer):
    prepared = prepare_completion(
        CompletionRequest.parse({"prompt": "Hi", "stream": True, "logprobs": 0}), served
    )
    _, deltas = finish(tokenizer, prepared, [" there friend"])
    offset, chunks = 0, []
    for index, delta in deltas:
        chunks.append(completion_chunk(prepared, index, delta, text_offset=offset))
        offset += len(delta.text)
    # OpenAI's type wants a finish_reason, which only the last chunk has; the others share its keys
    last = Completion.model_validate(chunks[-1])
    assert last.object == "text_completion" and last.choices[0].finish_reason == "length"
    assert all(
        c.keys() == chunks[-1].keys() and c["choices"][0].keys() == chunks[-1]["choices"][0].keys()
        for c in chunks
    )
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert "".join(c["choices"][0]["text"] for c in chunks) == " there friend"
    assert [c["choices"][0]["logprobs"]["text_offset"][0] for c in chunks] == [0, len(" there")]
    assert all("usage" not in c for c in chunks)  # only with stream_options.include_usage


def test_sse_framing_and_errors_mid_stream():
    assert sse({"a": "é"}) == 'data: {"a": "é"}\n\n'
    assert SSE_DONE == "data: [DONE]\n\n"
    event = sse_error(OpenAIError(500, "worker lost"))
    assert json.loads(event.removeprefix("data: "))["error"]["message"] == "worker lost"
