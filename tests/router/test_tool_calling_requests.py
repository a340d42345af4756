"""Tool calling through the router's HTTP API, in front of a fake worker that answers chosen
token ids: a call the model writes in the --tool-call-parser's format comes back as
`tool_calls` with finish_reason "tool_calls", whole and streamed (the streamed pieces make
the same call); tool_choice "required" and named functions put their constraint on the
wire and read the constrained output back as calls; the tools reach the chat template;
every malformed request is a 400 naming the field, and nothing reaches a worker."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from common.config.arg_parser import PdserveArgumentParser
from common.openai_api.tool_calls import ToolChoice, tool_choice_spec
from common.protocol import GenerateRequest
from router.cli import add_router_args, config_from_args
from tests.router.app_harness import (
    assert_openai_error,
    embedded_tokenizer,
    running_router,
    served_model,
    sse_events,
)
from tests.router.fake_worker import EOS, FakeWorker

CHAT = "/v1/chat/completions"
MAX_MODEL_LEN = 1024  # the tools in the system prompt take about 250 tokens
TEMPLATE = (Path(__file__).parents[1] / "data" / "hermes_tool_chat_template.jinja").read_text()
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather now in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "The sum of two integers",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}
TOOLS = [WEATHER, ADD]
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
SUM_CALL = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'
# what the fake model answers to a user message that holds "[key]"
ANSWERS = {
    "call": CALL,
    "text then call": "Let me look that up.\n" + CALL,
    "two calls": CALL + "\n" + SUM_CALL,
    "plain": "It is sunny in Paris.",
    "required": '[{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": "add", "parameters": {"a": 2, "b": 3}}]',
    "named": '{"city": "Paris"}',
}  # fmt: skip
SPECIAL = 3  # <repo_name>: a special token, which decoding normally leaves out


def script(tokenizer):
    def answer(prompt: list[int]) -> list[int]:
        text = tokenizer.decode(prompt, skip_special_tokens=False)
        if "[special]" in text:
            return [*tokenizer.encode("Hi", add_special_tokens=False), SPECIAL, EOS]
        key = max((k for k in ANSWERS if f"[{k}]" in text), key=text.rfind, default=None)
        reply = ANSWERS[key] if key is not None else "ok"
        return [*tokenizer.encode(reply, add_special_tokens=False), EOS]

    return answer


@pytest.fixture(scope="module")
def tokenizer():
    return embedded_tokenizer()


@pytest.fixture(scope="module")
def worker(tokenizer):
    return FakeWorker(script=script(tokenizer), token_interval_s=0.002)


@pytest.fixture(scope="module")
def client(tokenizer, worker):
    """A server with --enable-auto-tool-choice --tool-call-parser hermes and a Hermes-style template."""
    served = replace(
        served_model(tokenizer),
        max_model_len=MAX_MODEL_LEN,
        chat_template=TEMPLATE,
        enable_auto_tool_choice=True,
        tool_call_parser="hermes",
    )
    with running_router(served, [worker]) as live, httpx.Client(base_url=live.url, timeout=10) as http:
        yield http


@pytest.fixture(scope="module")
def plain_worker(tokenizer):
    return FakeWorker(script=script(tokenizer), token_interval_s=0.002)


@pytest.fixture(scope="module")
def plain_client(tokenizer, plain_worker):
    """A server without a tool-call parser that leaves tools out of prompts under tool_choice "none"."""
    served = replace(
        served_model(tokenizer),
        max_model_len=MAX_MODEL_LEN,
        chat_template=TEMPLATE,
        exclude_tools_when_tool_choice_none=True,
    )
    with running_router(served, [plain_worker]) as live, httpx.Client(base_url=live.url, timeout=10) as http:
        yield http


def ask(key: str, **fields) -> dict:
    return {"messages": [{"role": "user", "content": f"[{key}] What is the weather in Paris?"}], "tools": TOOLS,
            "max_tokens": 100, **fields}  # fmt: skip


def whole(client: httpx.Client, body: dict) -> dict:
    response = client.post(CHAT, json=body)
    assert response.status_code == 200, response.text
    ChatCompletion.model_validate(response.json())
    return response.json()


def streamed(client: httpx.Client, body: dict) -> list[dict]:
    response = client.post(CHAT, json={**body, "stream": True})
    assert response.status_code == 200, response.text
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)
    return chunks


def joined(chunks: list[dict], index: int = 0) -> dict:
    """One choice's stream put together: content, reasoning, calls (by index), finish_reason;
    checks that each call's first piece carries its id, type and name, and later ones do not."""
    content, calls, finish = [], {}, []
    for chunk in chunks:
        for choice in chunk["choices"]:
            if choice["index"] != index:
                continue
            delta = choice["delta"]
            content.append(delta.get("content") or "")
            for piece in delta.get("tool_calls", []):
                if piece["index"] not in calls:
                    assert piece["id"].startswith("chatcmpl-tool-") and piece["type"] == "function", piece
                    calls[piece["index"]] = {"name": piece["function"]["name"], "arguments": ""}
                else:
                    assert "id" not in piece and "name" not in piece["function"], piece
                calls[piece["index"]]["arguments"] += piece["function"].get("arguments", "")
            finish.append(choice["finish_reason"])
    assert all(reason is None for reason in finish[:-1]), finish
    return {
        "content": "".join(content),
        "calls": [calls[i] for i in sorted(calls)],
        "finish_reason": finish[-1],
    }


def calls_of(message: dict) -> list[dict]:
    return [call["function"] for call in message["tool_calls"]]


def test_a_call_the_model_writes_comes_back_as_tool_calls(client):
    choice = whole(client, ask("call"))["choices"][0]
    message = choice["message"]
    assert choice["finish_reason"] == "tool_calls"
    assert message["content"] is None
    assert calls_of(message) == [{"name": "get_weather", "arguments": '{"city": "Paris"}'}]
    (call,) = message["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("chatcmpl-tool-")


def test_streamed_pieces_make_the_same_calls_as_the_whole_response(client):
    for key in ("call", "two calls", "text then call"):
        message = whole(client, ask(key))["choices"][0]["message"]
        stream = joined(streamed(client, ask(key)))
        assert stream["finish_reason"] == "tool_calls", key
        assert stream["calls"] == calls_of(message), key
        assert stream["content"] == (message["content"] or ""), key


def test_text_before_the_call_is_content_and_several_calls_keep_their_order(client):
    message = whole(client, ask("text then call"))["choices"][0]["message"]
    assert message["content"] == "Let me look that up.\n"
    assert [call["name"] for call in calls_of(message)] == ["get_weather"]
    message = whole(client, ask("two calls"))["choices"][0]["message"]
    assert calls_of(message) == [
        {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"name": "add", "arguments": '{"a": 2, "b": 3}'},
    ]


def test_an_answer_without_a_call_is_content_that_finishes_as_stop(client):
    choice = whole(client, ask("plain"))["choices"][0]
    assert choice["message"]["content"] == "It is sunny in Paris." and choice["message"]["tool_calls"] == []
    assert choice["finish_reason"] == "stop"
    stream = joined(streamed(client, ask("plain")))
    assert stream == {"content": "It is sunny in Paris.", "calls": [], "finish_reason": "stop"}


def test_each_of_n_streamed_choices_has_its_own_parser(client):
    chunks = streamed(client, ask("two calls", n=2))
    for index in (0, 1):
        stream = joined(chunks, index)
        assert [call["name"] for call in stream["calls"]] == ["get_weather", "add"], index
        assert stream["finish_reason"] == "tool_calls"


def test_tool_choice_none_reads_no_calls(client):
    choice = whole(client, ask("call", tool_choice="none"))["choices"][0]
    assert choice["message"]["content"] == CALL and choice["message"]["tool_calls"] == []
    assert choice["finish_reason"] == "stop"


def test_special_tokens_stay_in_the_text_a_tool_parser_reads(client):
    assert whole(client, ask("special"))["choices"][0]["message"]["content"] == "Hi<repo_name>"
    without_tools = {"messages": ask("special")["messages"]}
    assert whole(client, without_tools)["choices"][0]["message"]["content"] == "Hi"


# -- forced calls: tool_choice "required" and a named function --------------------------------


def sent_to(worker: FakeWorker) -> list[GenerateRequest]:
    return worker.messages(GenerateRequest)


@pytest.mark.parametrize(
    ("tool_choice", "parallel", "choice"),
    [
        ("required", True, ToolChoice("required")),
        ("required", False, ToolChoice("required")),
        ({"type": "function", "function": {"name": "add"}}, True, ToolChoice("function", "add")),
    ],
    ids=["required", "required, one call", "named"],
)
def test_forced_tool_choices_put_their_constraint_on_the_wire(client, worker, tool_choice, parallel, choice):
    before = len(sent_to(worker))
    whole(client, ask("required", tool_choice=tool_choice, parallel_tool_calls=parallel))
    (request,) = sent_to(worker)[before:]
    spec = request.sampling().structured_outputs
    assert spec == tool_choice_spec(choice, TOOLS, parallel)
    schema = json.loads(spec.text)
    if choice.mode == "required":
        assert schema["minItems"] == 1 and schema.get("maxItems") == (None if parallel else 1)
        names = [branch["properties"]["name"]["enum"] for branch in schema["items"]["anyOf"]]
        assert names == [["get_weather"], ["add"]]
    else:
        assert schema == ADD["function"]["parameters"]


def test_required_output_is_read_back_as_calls(client):
    body = ask("required", tool_choice="required")
    choice = whole(client, body)["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    expected = [
        {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"name": "add", "arguments": '{"a": 2, "b": 3}'},
    ]
    assert calls_of(choice["message"]) == expected
    stream = joined(streamed(client, body))
    assert stream["calls"] == expected and stream["finish_reason"] == "tool_calls"


def test_a_named_function_gets_the_whole_output_as_its_arguments(client):
    body = ask("named", tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = whole(client, body)["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert calls_of(choice["message"]) == [{"name": "get_weather", "arguments": '{"city": "Paris"}'}]
    stream = joined(streamed(client, body))
    assert stream["calls"] == calls_of(choice["message"]) and stream["finish_reason"] == "tool_calls"


def test_a_forced_output_cut_by_max_tokens_finishes_as_length(client):
    body = ask("required", tool_choice="required", max_tokens=5)
    choice = whole(client, body)["choices"][0]
    assert choice["finish_reason"] == "length" and choice["message"]["tool_calls"] == []
    assert joined(streamed(client, body))["finish_reason"] == "length"


# -- the prompt ---------------------------------------------------------------------------------


def last_prompt(worker: FakeWorker, tokenizer) -> str:
    return tokenizer.decode(sent_to(worker)[-1].prompt_token_ids, skip_special_tokens=False)


def test_tools_are_rendered_into_the_chat_template(client, worker, tokenizer):
    whole(client, ask("plain"))
    prompt = last_prompt(worker, tokenizer)
    assert json.dumps(WEATHER, ensure_ascii=False) in prompt and json.dumps(ADD) in prompt
    whole(client, ask("plain", tool_choice="none"))  # shown, though no call will be read
    assert json.dumps(WEATHER) in last_prompt(worker, tokenizer)


def test_exclude_tools_when_tool_choice_none_leaves_them_out(plain_client, plain_worker, tokenizer):
    whole(plain_client, ask("plain", tool_choice="none"))
    prompt = last_prompt(plain_worker, tokenizer)
    assert "get_weather" not in prompt and prompt.endswith("<|im_start|>assistant\n")
    whole(plain_client, ask("plain", tool_choice="required"))
    assert "get_weather" in last_prompt(plain_worker, tokenizer)


def test_tokenize_renders_the_tools_as_a_chat_request_does(client, worker, tokenizer):
    body = ask("plain", max_tokens=1)
    whole(client, body)
    sent = sent_to(worker)[-1].prompt_token_ids
    tokens = client.post("/tokenize", json={"messages": body["messages"], "tools": TOOLS}).json()["tokens"]
    assert tokens == sent
    without = client.post("/tokenize", json={"messages": body["messages"]}).json()["tokens"]
    assert len(without) < len(tokens)


def test_a_history_of_calls_and_results_renders(client, worker, tokenizer):
    history = [
        {"role": "user", "content": "[plain] Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "chatcmpl-tool-1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "chatcmpl-tool-1", "content": "sunny, 24 C"},
    ]  # fmt: skip
    whole(client, {"messages": history, "tools": TOOLS})
    prompt = last_prompt(worker, tokenizer)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert "<tool_response>\nsunny, 24 C\n</tool_response>" in prompt


# -- refusals ------------------------------------------------------------------------------------

NAMED_ADD = {"type": "function", "function": {"name": "add"}}
BAD = [
    ("tools not a list", {"tools": {"type": "function"}}, "tools", "tools"),
    ("a tool without a function", {"tools": [{"type": "function"}]}, "tools", 'tools[0] has no "function" object'),
    ("a tool of another type", {"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools",
     'only "function" tools are supported'),
    ("parameters that are not a schema", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": 5}}}]}, "tools", "tools[0] (f): parameters"),
    ("an empty tools list", {"tools": []}, "tools", "tools is an empty list"),
    ("an unknown function", {"tool_choice": {"type": "function", "function": {"name": "fly"}}}, "tool_choice",
     "'fly', which is not among the tools (get_weather, add)"),
    ("tool_choice without tools", {"tools": None, "tool_choice": "required"}, "tool_choice", "needs tools"),
    ("a named function without tools", {"tools": None, "tool_choice": NAMED_ADD}, "tool_choice",
     "no tools were sent"),
    ("an unknown tool_choice", {"tool_choice": "sometimes"}, "tool_choice", "'sometimes' is not supported"),
    ("required with response_format", {"tool_choice": "required", "response_format": {"type": "json_object"}},
     "tool_choice", 'tool_choice "required" and response_format both constrain the output'),
    ("a named function with guided_regex", {"tool_choice": NAMED_ADD, "guided_regex": "a+"}, "tool_choice",
     "tool_choice (the function 'add') and guided_regex both constrain the output"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "fields", "param", "says"), BAD, ids=[case[0] for case in BAD])
def test_a_bad_tool_request_is_a_400_and_reaches_no_worker(client, worker, name, fields, param, says):
    before = len(sent_to(worker))
    error = assert_openai_error(client.post(CHAT, json=ask("call", **fields)), 400)
    assert (error["type"], error["param"]) == ("BadRequestError", param), error
    assert says in error["message"], error
    # the next request is the first the worker gets (one connection keeps the order)
    after = {"messages": [{"role": "user", "content": "after"}], "max_tokens": 1}
    assert client.post(CHAT, json=after).status_code == 200
    assert [r.sampling().max_tokens for r in sent_to(worker)[before:]] == [1]


def test_auto_tool_choice_needs_the_servers_tool_parser(plain_client, plain_worker):
    before = len(sent_to(plain_worker))
    for fields in ({}, {"tool_choice": "auto"}):  # without tool_choice, tools ask for "auto"
        error = assert_openai_error(plain_client.post(CHAT, json=ask("call", **fields)), 400)
        assert error["param"] == "tool_choice"
        assert error["message"].startswith(
            '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'
        )
    assert sent_to(plain_worker)[before:] == []
    # forced calls need no parser
    named = {"type": "function", "function": {"name": "get_weather"}}
    message = whole(plain_client, ask("named", tool_choice=named))["choices"][0]["message"]
    assert calls_of(message) == [{"name": "get_weather", "arguments": '{"city": "Paris"}'}]


# -- flags ---------------------------------------------------------------------------------------


def router_args(*argv: str):
    parser = PdserveArgumentParser(prog="pdserve router")
    add_router_args(parser)
    return parser.parse_args(["--decode-workers", "tcp://127.0.0.1:9100", *argv])


def test_the_tool_flags_reach_the_served_model():
    _, settings = config_from_args(
        router_args("--enable-auto-tool-choice", "--tool-call-parser", "llama3_json",
                    "--exclude-tools-when-tool-choice-none")
    )  # fmt: skip
    assert (settings.enable_auto_tool_choice, settings.tool_call_parser) == (True, "llama3_json")
    assert settings.exclude_tools_when_tool_choice_none


def test_auto_tool_choice_without_a_parser_stops_the_router():
    with pytest.raises(ValueError, match="Error: --enable-auto-tool-choice requires --tool-call-parser"):
        config_from_args(router_args("--enable-auto-tool-choice"))
    with pytest.raises(SystemExit):
        router_args("--tool-call-parser", "pythonic")  # not one of the parsers
