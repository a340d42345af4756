"""Reasoning output through the router's HTTP API (--reasoning-parser deepseek_r1 and qwen3),
in front of a fake worker that answers chosen token ids: the reasoning comes back as
`reasoning_content` beside `content`, whole and streamed; a tool call after the reasoning
is read from the content alone; a constrained request waits for the end of reasoning
(structured_outputs_after on the wire) unless enable_in_reasoning or the prompt already
ended it; a model without the tags is refused at start-up."""

from __future__ import annotations

import json
from dataclasses import replace

import httpx
import pytest
import tokenizers

from common.config.structured_outputs_config import StructuredOutputsConfig
from common.protocol import GenerateRequest
from common.tokenizer import Tokenizer
from tests.router.app_harness import embedded_tokenizer, running_router, served_model, sse_events
from tests.router.fake_worker import EOS, FakeWorker

CHAT = "/v1/chat/completions"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
# what the fake model answers to a user message that holds "[key]"
ANSWERS = {
    "think": "<think>The user greets me.\nI greet back.</think>\n\nHello!",
    "open": "The user greets me.</think>Hello!",  # DeepSeek-R1: the template opened the reasoning
    "no reasoning": "Hello!",
    "cut": "<think>Still thinking about",
    "think then call": "<think>I need the weather.</think>\n" + CALL,
}


def thinking_tokenizer() -> Tokenizer:
    """The embedded tokenizer with <think> and </think> added as single tokens."""
    base = embedded_tokenizer()
    backend = tokenizers.Tokenizer.from_str(base.backend.to_str())
    backend.add_tokens(
        [tokenizers.AddedToken(tag, special=False, normalized=False) for tag in ("<think>", "</think>")]
    )
    return Tokenizer(backend, base.special_tokens, base.chat_templates, base.eos_token_ids)


@pytest.fixture(scope="module")
def tokenizer():
    return thinking_tokenizer()


@pytest.fixture(scope="module", params=["deepseek_r1", "qwen3"])
def parser(request):
    return request.param


@pytest.fixture(scope="module")
def worker(tokenizer, parser):  # one per parser: a router stops its workers when it stops
    def answer(prompt: list[int]) -> list[int]:
        text = tokenizer.decode(prompt)
        reply = next((a for key, a in ANSWERS.items() if f"[{key}]" in text), "ok")
        return [*tokenizer.encode(reply, add_special_tokens=False), EOS]

    return FakeWorker(script=answer, token_interval_s=0.002)


def served(tokenizer, parser: str, **fields):
    config = StructuredOutputsConfig(reasoning_parser=parser, **fields)
    return replace(
        served_model(tokenizer),
        vocab_size=tokenizer.vocab_size,
        structured_outputs=config,
        enable_auto_tool_choice=True,
        tool_call_parser="hermes",
    )


@pytest.fixture(scope="module")
def client(tokenizer, worker, parser):
    with (
        running_router(served(tokenizer, parser), [worker]) as live,
        httpx.Client(base_url=live.url, timeout=10) as http,
    ):
        yield http


def ask(key: str, **fields) -> dict:
    return {"messages": [{"role": "user", "content": f"[{key}] hi"}], "max_tokens": 60, **fields}


def whole(client: httpx.Client, body: dict) -> dict:
    response = client.post(CHAT, json=body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


def streamed(client: httpx.Client, body: dict) -> dict:
    response = client.post(CHAT, json={**body, "stream": True})
    assert response.status_code == 200, response.text
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    reasoning, content, names, finish = [], [], [], None
    for event in events[:-1]:
        (choice,) = json.loads(event)["choices"]
        delta = choice["delta"]
        reasoning.append(delta.get("reasoning_content") or "")
        content.append(delta.get("content") or "")
        names += [
            piece["function"]["name"] for piece in delta.get("tool_calls", []) if "name" in piece["function"]
        ]
        finish = choice["finish_reason"]
    return {"reasoning": "".join(reasoning) or None, "content": "".join(content) or None, "calls": names,
            "finish_reason": finish}  # fmt: skip


def test_reasoning_comes_apart_from_the_answer(client, parser):
    choice = whole(client, ask("think"))
    assert choice["message"]["reasoning_content"] == "The user greets me.\nI greet back."
    assert choice["message"]["content"] == "\n\nHello!"
    assert choice["finish_reason"] == "stop"
    assert streamed(client, ask("think")) == {
        "reasoning": "The user greets me.\nI greet back.", "content": "\n\nHello!", "calls": [], "finish_reason": "stop"
    }  # fmt: skip


def test_an_output_without_the_opening_tag_reads_as_each_model_writes(client, parser):
    message = whole(client, ask("open"))["message"]
    if parser == "deepseek_r1":  # the prompt opened the reasoning: up to </think> is reasoning
        assert (message["reasoning_content"], message["content"]) == ("The user greets me.", "Hello!")
    else:  # Qwen3 opens its reasoning itself: without <think> it all is the answer
        assert (message["reasoning_content"], message["content"]) == (
            None,
            "The user greets me.</think>Hello!",
        )
    stream = streamed(client, ask("open"))
    assert (stream["reasoning"], stream["content"]) == (message["reasoning_content"], message["content"])


def test_an_output_cut_inside_the_reasoning_is_reasoning(client):
    choice = whole(client, ask("cut", max_tokens=4))
    assert choice["message"]["content"] is None and choice["message"]["reasoning_content"]
    assert choice["finish_reason"] == "length"


def test_include_reasoning_false_leaves_the_reasoning_out(client):
    message = whole(client, ask("think", include_reasoning=False))["message"]
    assert message["reasoning_content"] is None and message["content"] == "\n\nHello!"


def test_a_tool_call_after_the_reasoning_is_read_from_the_answer(client):
    body = ask("think then call", tools=[WEATHER])
    choice = whole(client, body)
    assert choice["message"]["reasoning_content"] == "I need the weather."
    assert [call["function"] for call in choice["message"]["tool_calls"]] == [
        {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    ]
    assert choice["finish_reason"] == "tool_calls"
    stream = streamed(client, body)
    assert (stream["reasoning"], stream["calls"], stream["finish_reason"]) == (
        "I need the weather.", ["get_weather"], "tool_calls"
    )  # fmt: skip


# -- constrained requests wait for the end of reasoning ----------------------------------------


def sent_after(client: httpx.Client, worker: FakeWorker, path: str, body: dict) -> int | None:
    before = len(worker.messages(GenerateRequest))
    response = client.post(path, json={**body, "max_tokens": 2})
    assert response.status_code == 200, response.text
    (request,) = worker.messages(GenerateRequest)[before:]
    return request.sampling().structured_outputs_after


def test_a_constrained_request_waits_for_the_end_of_reasoning(client, worker, tokenizer):
    end = tokenizer.token_to_id("</think>")
    for fields in (
        {"response_format": {"type": "json_object"}},
        {"tools": [WEATHER], "tool_choice": "required"},
        {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
    ):
        assert sent_after(client, worker, CHAT, ask("no reasoning", **fields)) == end, fields
    assert sent_after(client, worker, "/v1/completions", {"prompt": "hi", "guided_regex": "a+"}) == end
    # free text, or a prompt that has ended the reasoning already (Qwen3 without thinking)
    assert sent_after(client, worker, CHAT, ask("no reasoning")) is None
    ended = {"prompt": "<think>\n\n</think>\n\n", "guided_regex": "a+"}
    assert sent_after(client, worker, "/v1/completions", ended) is None


def test_enable_in_reasoning_constrains_from_the_first_token(tokenizer):
    worker = FakeWorker(script=lambda prompt: [EOS])
    with (
        running_router(served(tokenizer, "qwen3", enable_in_reasoning=True), [worker]) as live,
        httpx.Client(base_url=live.url, timeout=10) as http,
    ):
        body = ask("no reasoning", response_format={"type": "json_object"})
        assert sent_after(http, worker, CHAT, body) is None


def test_a_model_without_the_tags_is_refused_at_start_up():
    """The embedded SmolLM2 has no </think>: the router's ServedModel (what `pdserve router`
    builds before it serves anything, turning the ValueError into its exit message) refuses."""
    config = StructuredOutputsConfig(reasoning_parser="qwen3")
    with pytest.raises(ValueError, match="--reasoning-parser qwen3 needs </think> as one token"):
        replace(served_model(embedded_tokenizer()), structured_outputs=config)
