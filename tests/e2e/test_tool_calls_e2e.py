"""Tool calling through the whole system and the real `openai` client: `pdserve serve` on
loopback (one prefill worker, one decode worker, the router; the embedded SmolLM2 on CPU)
with --enable-auto-tool-choice --tool-call-parser hermes and a Hermes-style chat template.

tool_choice "required" and a named function constrain the output, so even this 135M
model answers with calls whose arguments follow the tool's parameters schema (checked
with jsonschema), whole and streamed; the streamed pieces make the same calls as the
whole answer (greedy decoding)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import openai
import pytest

from tests.harness.stack import ServeStack

MODEL = "SmolLM2-135M-Instruct"
TEMPLATE = Path(__file__).parents[1] / "data" / "hermes_tool_chat_template.jinja"
MAX_TOKENS = 80  # the calls take about 40; the prompt, with the tools, about 420 of the 512
# three tools with different kinds of parameters; strings and numbers are bounded, so a
# greedy small model cannot write one forever
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Sum of two integers",
            "parameters": {
                "type": "object",
                "properties": {
                    "a": {"type": "integer", "minimum": 0, "maximum": 1000},
                    "b": {"type": "integer", "minimum": 0, "maximum": 1000},
                },
                "required": ["a", "b"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "set_reminder",
            "description": "Remind the user",
            "parameters": {
                "type": "object",
                "properties": {
                    "text": {"type": "string", "maxLength": 24},
                    "minutes": {"type": "integer", "minimum": 1, "maximum": 120},
                    "urgent": {"type": "boolean"},
                },
                "required": ["text", "minutes", "urgent"],
                "additionalProperties": False,
            },
        },
    },
]
PARAMETERS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}


@pytest.fixture(scope="module")
def stack():
    serve = ServeStack(
        [
            "--dtype", "float32", "--device", "cpu", "--max-model-len", "512",
            "--num-gpu-blocks-override", "64",
            "--num-prefill-workers", "1", "--num-decode-workers", "1",
            "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
            "--chat-template", str(TEMPLATE),
            # compact JSON: free whitespace lets a greedy small model indent its way to max_tokens
            "--structured-outputs-config.disable_any_whitespace", "true",
            "--disable-uvicorn-access-log",
            "--worker-health-timeout", "30",  # a CPU step can keep a worker silent on a busy machine
        ]
    )  # fmt: skip
    try:
        yield serve.ready()
    finally:
        serve.stop_checked()


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=stack.url + "/v1", api_key="none", timeout=120, max_retries=0)


def ask(client: openai.OpenAI, question: str, tool_choice, stream: bool = False, **extra):
    return client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": question}],
        tools=TOOLS,
        tool_choice=tool_choice,
        temperature=0,
        max_tokens=MAX_TOKENS,
        stream=stream,
        **extra,
    )


def whole_calls(client: openai.OpenAI, question: str, tool_choice, **extra) -> list[tuple[str, str]]:
    choice = ask(client, question, tool_choice, **extra).choices[0]
    assert choice.finish_reason == "tool_calls", choice
    for call in choice.message.tool_calls or []:
        assert call.type == "function" and call.id
    return [(call.function.name, call.function.arguments) for call in choice.message.tool_calls or []]


def streamed_calls(client: openai.OpenAI, question: str, tool_choice, **extra) -> list[tuple[str, str]]:
    names: dict[int, str] = {}
    arguments: dict[int, str] = {}
    finish = None
    for chunk in ask(client, question, tool_choice, stream=True, **extra):
        for choice in chunk.choices:
            for piece in choice.delta.tool_calls or []:
                if piece.function.name is not None:
                    assert piece.id and piece.index not in names
                    names[piece.index] = piece.function.name
                arguments[piece.index] = arguments.get(piece.index, "") + (piece.function.arguments or "")
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    return [(names[index], arguments.get(index, "")) for index in sorted(names)]


def whole_and_streamed(
    client: openai.OpenAI, question: str, tool_choice, **extra
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The calls of a whole answer and of a streamed one to the same request, both served
    after a first whole answer has put the prompt's blocks in the prefix cache: the pair then
    prefills the same uncached tail, so greedy decoding meets the same numbers. (A first
    request prefills more of the prompt than a repeat; in fp32 on a CPU the longer prefill
    rounds differently, enough to flip a near tie such as this model's true/false.)"""
    whole_calls(client, question, tool_choice, **extra)
    return whole_calls(client, question, tool_choice, **extra), streamed_calls(
        client, question, tool_choice, **extra
    )


def assert_valid(calls: list[tuple[str, str]], names: set[str]) -> None:
    assert calls, "no tool call"
    for name, arguments in calls:
        assert name in names, name
        jsonschema.validate(json.loads(arguments), PARAMETERS[name])


def test_required_calls_follow_the_tools_schemas(client):
    question = "What is the weather in Tokyo?"
    calls, streamed = whole_and_streamed(client, question, "required", parallel_tool_calls=False)
    assert len(calls) == 1
    assert_valid(calls, set(PARAMETERS))
    assert streamed == calls


@pytest.mark.parametrize("name", ["add", "set_reminder"])
def test_a_named_function_is_called_with_arguments_that_follow_its_schema(client, name):
    question = "Add 12 and 30." if name == "add" else "Remind me to call mom in 10 minutes."
    tool_choice = {"type": "function", "function": {"name": name}}
    calls, streamed = whole_and_streamed(client, question, tool_choice)
    assert len(calls) == 1
    assert_valid(calls, {name})
    assert streamed == calls
