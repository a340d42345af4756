"""Tool-call parsers read the formats vLLM's --tool-call-parser names read, and a stream of
any output, cut anywhere, sends exactly what reading the whole output gives."""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass

import pytest

from common.openai_api.tool_calls import (
    ContentDelta,
    ExtractedToolCalls,
    ToolCall,
    ToolCallDelta,
    ToolParser,
    collect_deltas,
    get_tool_parser,
)
from tests.harness.torch_free import assert_imports_without_torch

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "days": {"type": "integer"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "search",
            "parameters": {
                "type": "object",
                "properties": {
                    "query": {"type": "string"},
                    "limit": {"type": "integer"},
                    "threshold": {"type": "number"},
                    "exact": {"type": "boolean"},
                    "filters": {"type": "object"},
                    "tags": {"type": "array", "items": {"type": "string"}},
                    "after": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                    "page": {"type": ["integer", "null"]},
                },
            },
        },
    },
    {"type": "function", "function": {"name": "get_time"}},
]

NESTED = {
    "query": 'café "naïve" 東京 🗼 \\ back',
    "filters": {"tags": ["a", "b"], "range": {"min": 1, "max": 2.5}, "none": None},
    "limit": 3,
}


@dataclass(frozen=True)
class Case:
    output: str
    content: str | None
    calls: list[tuple[str, str]]  # (name, arguments JSON text)


def args(value: dict) -> str:
    """Arguments as vLLM re-serializes them."""
    return json.dumps(value, ensure_ascii=False)


WEATHER = args({"city": "Paris", "unit": "celsius"})

HERMES = {
    "one call": Case(
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>',
        None,
        [("get_weather", WEATHER)],
    ),
    "content before the call": Case(
        'Let me check the weather.\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city":"Paris","unit":"celsius"}}\n</tool_call>',
        "Let me check the weather.\n",
        [("get_weather", WEATHER)],
    ),
    "several calls": Case(
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
        None,
        [("get_weather", WEATHER), ("get_time", "{}")],
    ),
    "nested objects, unicode and escaped quotes": Case(
        '<tool_call>{"name": "search", "arguments": ' + json.dumps(NESTED) + "}</tool_call>",
        None,
        [("search", args(NESTED))],
    ),
    "no call": Case(
        "It is 21 °C in Paris; x < y and <b>bold</b>.", "It is 21 °C in Paris; x < y and <b>bold</b>.", []
    ),
    "malformed JSON stays content": Case(
        'I will call it.<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"</tool_call>',
        'I will call it.<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"</tool_call>',
        [],
    ),
    "a call without arguments is malformed": Case(
        '<tool_call>{"name": "get_time"}</tool_call>', '<tool_call>{"name": "get_time"}</tool_call>', []
    ),
    "a malformed call after a good one stays content": Case(
        '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>\n<tool_call>{"name": oops}</tool_call>',
        '<tool_call>{"name": oops}</tool_call>',
        [("get_time", "{}")],
    ),
    "a call still open at the end is read": Case(
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n', None, [("get_time", "{}")]
    ),
    "an output cut inside a call stays content": Case(
        'Sure.<tool_call>\n{"name": "get_weather", "argum',
        'Sure.<tool_call>\n{"name": "get_weather", "argum',
        [],
    ),
    "text after the calls is left out": Case(
        '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>\nDone.', None, [("get_time", "{}")]
    ),
    "partial marker at the end is content": Case("Use the <tool_", "Use the <tool_", []),
    "NaN is not JSON": Case(
        '<tool_call>{"name": "search", "arguments": {"threshold": NaN}}</tool_call>',
        '<tool_call>{"name": "search", "arguments": {"threshold": NaN}}</tool_call>',
        [],
    ),
}

LLAMA3_JSON = {
    "one call with parameters": Case(
        '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
        None,
        [("get_weather", WEATHER)],
    ),
    "after the python tag, with arguments": Case(
        '<|python_tag|>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
        None,
        [("get_weather", WEATHER)],
    ),
    "several calls separated by semicolons": Case(
        '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; '
        '{"name": "get_time", "parameters": {}}',
        None,
        [("get_weather", WEATHER), ("get_time", "{}")],
    ),
    "nested objects, unicode and escaped quotes": Case(
        '\n\n{"name": "search", "parameters": ' + json.dumps(NESTED, ensure_ascii=False) + "}",
        None,
        [("search", args(NESTED))],
    ),
    "plain answer": Case("The weather in Paris is sunny.", "The weather in Paris is sunny.", []),
    "content before the call makes it all content": Case(
        'Sure! {"name": "get_time", "parameters": {}}', 'Sure! {"name": "get_time", "parameters": {}}', []
    ),
    "malformed first call": Case(
        '{"name": "get_weather", "parameters": {"city": }}',
        '{"name": "get_weather", "parameters": {"city": }}',
        [],
    ),
    "malformed second call": Case(
        '{"name": "get_time", "parameters": {}}; {"name": "search", "parameters": oops}',
        '{"name": "search", "parameters": oops}',
        [("get_time", "{}")],
    ),
    "a JSON answer that is no call": Case('{"city": "Paris"}', '{"city": "Paris"}', []),
    "text after the last call is left out": Case(
        '{"name": "get_time", "parameters": {}}\n\nI called it.', None, [("get_time", "{}")]
    ),
    "an output cut inside a call": Case(
        '<|python_tag|>{"name": "get_weather", "parameters": {"ci',
        '<|python_tag|>{"name": "get_weather", "parameters": {"ci',
        [],
    ),
    "the python tag alone": Case("<|python_tag|>", "<|python_tag|>", []),
    "whitespace only": Case("  \n", "  \n", []),
}

MISTRAL = {
    "list form": Case(
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]',
        None,
        [("get_weather", WEATHER)],
    ),
    "list form, several calls": Case(
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}, '
        '{"name": "get_time", "arguments": {}}]',
        None,
        [("get_weather", WEATHER), ("get_time", "{}")],
    ),
    "content before the calls": Case(
        'Checking now. [TOOL_CALLS] [{"name": "get_time"}]', "Checking now. ", [("get_time", "{}")]
    ),
    "list form, nested objects, unicode and escaped quotes": Case(
        '[TOOL_CALLS] [{"name": "search", "arguments": ' + json.dumps(NESTED) + "}]",
        None,
        [("search", args(NESTED))],
    ),
    "name and [ARGS] form": Case(
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}', None, [("get_weather", WEATHER)]
    ),
    "name form, several calls, arguments as written": Case(
        '[TOOL_CALLS]get_weather[ARGS]{"city":"Paris"}[TOOL_CALLS]search{"filters": {"tags": ["a", "b"]}, '
        '"query": "caf\\u00e9 \\"x\\""}',
        None,
        [
            ("get_weather", '{"city":"Paris"}'),
            ("search", '{"filters": {"tags": ["a", "b"]}, "query": "caf\\u00e9 \\"x\\""}'),
        ],
    ),
    "no marker": Case("Paris is sunny [today].", "Paris is sunny [today].", []),
    "malformed list": Case(
        'Ok.[TOOL_CALLS] [{"name": "get_time", "arguments": {}}, oops]',
        "Ok., oops]",
        [("get_time", "{}")],
    ),
    "malformed arguments in the name form": Case(
        '[TOOL_CALLS]get_weather[ARGS]{"city": Paris}', '[TOOL_CALLS]get_weather[ARGS]{"city": Paris}', []
    ),
    "prose after the marker is no name": Case(
        '[TOOL_CALLS]I will call a tool {"city": "Paris"}',
        '[TOOL_CALLS]I will call a tool {"city": "Paris"}',
        [],
    ),
    "an output cut inside the arguments": Case(
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Par', '[TOOL_CALLS]get_weather[ARGS]{"city": "Par', []
    ),
    "a marker inside a string cuts the call short": Case(
        '[TOOL_CALLS]search{"query": "[TOOL_CALLS]"}', '[TOOL_CALLS]search{"query": "[TOOL_CALLS]"}', []
    ),
}

QWEN3_CODER = {
    "one call": Case(
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>",
        None,
        [("get_weather", args({"city": "Paris", "days": 3}))],
    ),
    "content before, several calls": Case(
        "I'll look both up.\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "</function>\n</tool_call>\n<tool_call>\n<function=get_time>\n</function>\n</tool_call>",
        "I'll look both up.\n\n",
        [("get_weather", args({"city": "Paris"})), ("get_time", "{}")],
    ),
    "values converted by the schema": Case(
        "<tool_call>\n<function=search>\n<parameter=extra>\n42\n</parameter>\n<parameter=query>\nnull\n</parameter>\n"
        "<parameter=limit>\n10\n</parameter>\n"
        "<parameter=threshold>\n3.0\n</parameter>\n<parameter=exact>\nTrue\n</parameter>\n"
        '<parameter=filters>\n{"range": {"min": 1}, "name": "東京"}\n</parameter>\n'
        "<parameter=tags>\n['a', 'b']\n</parameter>\n<parameter=after>\nNone\n</parameter>\n"
        "<parameter=page>\nnull\n</parameter>\n</function>\n</tool_call>",
        None,
        [
            (
                "search",
                args(
                    {
                        "extra": "42",
                        "query": "null",
                        "limit": 10,
                        "threshold": 3,
                        "exact": True,
                        "filters": {"range": {"min": 1}, "name": "東京"},
                        "tags": ["a", "b"],
                        "after": None,
                        "page": None,
                    }
                ),
            )
        ],
    ),
    "values that do not fit their type stay text": Case(
        "<tool_call>\n<function=search>\n<parameter=limit>\nten\n</parameter>\n<parameter=threshold>\ninf\n"
        "</parameter>\n<parameter=filters>\n{broken\n</parameter>\n</function>\n</tool_call>",
        None,
        [("search", args({"limit": "ten", "threshold": "inf", "filters": "{broken"}))],
    ),
    "a value that contains the closing tags as text": Case(
        "<tool_call>\n<function=search>\n<parameter=query>\nx = '</parameter>' + \"quoted\" </function> y\n"
        "second line 🗼\n</parameter>\n</function>\n</tool_call>",
        None,
        [("search", args({"query": "x = '</parameter>' + \"quoted\" </function> y\nsecond line 🗼"}))],
    ),
    "a tag naming no parameter of the tool does not end the value before it": Case(
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=note>\nhi\n"
        "</parameter>\n</function>\n</tool_call>",
        None,
        [("get_weather", args({"city": "Paris\n</parameter>\n<parameter=note>\nhi"}))],
    ),
    "a bare function tag": Case(
        "<function=get_weather>\n<parameter=city>\nSão Paulo\n</parameter>\n</function>",
        None,
        [("get_weather", args({"city": "São Paulo"}))],
    ),
    "an output cut inside a value keeps what it has": Case(
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nPar",
        None,
        [("get_weather", args({"city": "Par"}))],
    ),
    "a missing closing parameter tag before the function's end": Case(
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</function>\n</tool_call>",
        None,
        [("get_weather", args({"city": "Paris"}))],
    ),
    "a function name that is a template leftover is text": Case(
        "<tool_call>\n<function={{ tc.name }}>\n</function>\n</tool_call>",
        "<tool_call>\n<function={{ tc.name }}>\n</function>\n</tool_call>",
        [],
    ),
    "a tool_call tag in prose is text": Case(
        "Wrap it in <tool_call> tags.", "Wrap it in <tool_call> tags.", []
    ),
    "text after the calls is left out": Case(
        "<tool_call>\n<function=get_time>\n</function>\n</tool_call>\nThat's all.", None, [("get_time", "{}")]
    ),
}

PARSERS: dict[str, dict[str, Case]] = {
    "hermes": HERMES,
    "llama3_json": LLAMA3_JSON,
    "mistral": MISTRAL,
    "qwen3_coder": QWEN3_CODER,
}
ALL_CASES = [(parser, name) for parser, cases in PARSERS.items() for name in cases]
CALL_ID = re.compile(r"chatcmpl-tool-[0-9a-f]{32}")


def make_parser(name: str) -> ToolParser:
    return get_tool_parser(name)(TOOLS)


def summary(result: ExtractedToolCalls) -> tuple[str | None, list[tuple[str, str]]]:
    return result.content, [(call.name, call.arguments) for call in result.calls]


def stream(parser: ToolParser, chunks: list[str]) -> list[ContentDelta | ToolCallDelta]:
    tool_stream = parser.stream()
    deltas = [delta for chunk in chunks for delta in tool_stream.feed(chunk)]
    return deltas + tool_stream.finish()


def random_chunks(text: str, rng: random.Random) -> list[str]:
    chunks, at = [], 0
    while at < len(text):
        size = rng.choice((1, 1, 2, 3, 5, 8, 13))
        chunks.append(text[at : at + size])
        at += size
    return chunks


def assert_openai_stream_shape(deltas: list[ContentDelta | ToolCallDelta]) -> None:
    """Each call: first an id, type and name under the next index; then arguments only."""
    seen: list[int] = []
    for delta in deltas:
        if isinstance(delta, ContentDelta):
            assert delta.text
            continue
        piece = delta.to_dict()
        if delta.index not in seen:
            assert delta.index == len(seen)
            seen.append(delta.index)
            assert CALL_ID.fullmatch(piece["id"])
            assert piece["type"] == "function" and set(piece["function"]) == {"name"}
        else:
            assert delta.index == seen[-1]
            assert set(piece) == {"index", "function"} and set(piece["function"]) == {"arguments"}
            assert piece["function"]["arguments"]


@pytest.mark.parametrize(("parser", "case"), ALL_CASES)
def test_extract_reads_the_format(parser, case):
    expected = PARSERS[parser][case]
    result = make_parser(parser).extract(expected.output)
    assert summary(result) == (expected.content, expected.calls)
    assert result.tools_called == bool(expected.calls)
    for call in result.calls:
        assert CALL_ID.fullmatch(call.id)
        json.loads(call.arguments)


@pytest.mark.parametrize(("parser", "case"), ALL_CASES)
def test_streaming_in_any_chunks_gives_what_extract_gives(parser, case):
    output = PARSERS[parser][case].output
    expected = summary(make_parser(parser).extract(output))
    rng = random.Random(f"{parser}/{case}")
    cuts = [list(output), [output], *(random_chunks(output, rng) for _ in range(8))]
    for chunks in cuts:
        deltas = stream(make_parser(parser), chunks)
        assert_openai_stream_shape(deltas)
        assert summary(collect_deltas(deltas)) == expected, chunks


def test_content_streams_before_the_call_and_a_partial_marker_waits():
    tool_stream = make_parser("hermes").stream()
    assert tool_stream.feed("Let me check. <tool") == [ContentDelta("Let me check. ")]
    assert tool_stream.feed("kit is") == [ContentDelta("<toolkit is")]
    assert tool_stream.feed(" ready <tool_call>{") == [ContentDelta(" ready ")]
    assert tool_stream.feed('"name": "get_time", "arguments": {}}') == []
    first, arguments = tool_stream.feed("</tool_call>")
    assert first.to_dict() == {
        "index": 0,
        "id": first.id,
        "type": "function",
        "function": {"name": "get_time"},
    }
    assert arguments.to_dict() == {"index": 0, "function": {"arguments": "{}"}}
    assert tool_stream.tools_called
    assert tool_stream.finish() == []


def test_qwen3_coder_streams_each_parameter_as_it_completes():
    tool_stream = make_parser("qwen3_coder").stream()
    assert tool_stream.feed("<tool_call>\n<function=get_weather") == []
    (header,) = tool_stream.feed(">\n<parameter=city>\nPar")
    assert header.name == "get_weather" and header.arguments is None
    assert tool_stream.feed("is\n</parameter>") == []  # a tag must follow before the value is known
    assert [d.arguments for d in tool_stream.feed("\n<parameter=days>\n2\n</parameter>\n")] == [
        '{"city": "Paris"'
    ]
    assert [d.arguments for d in tool_stream.feed("</function>")] == [', "days": 2', "}"]


def test_each_call_gets_its_own_id():
    output = HERMES["several calls"].output
    first, second = make_parser("hermes").extract(output).calls, make_parser("hermes").extract(output).calls
    ids = [call.id for call in first + second]
    assert len(set(ids)) == 4


def test_a_stream_is_used_once():
    tool_stream = make_parser("hermes").stream()
    assert tool_stream.feed("hi <tool_") == [ContentDelta("hi ")]
    assert tool_stream.finish() == [ContentDelta("<tool_")]
    assert tool_stream.finish() == []
    with pytest.raises(RuntimeError, match="finished"):
        tool_stream.feed("more")


LONG = 'x \\ "{[' * 10_000
LONG_OUTPUTS = {
    "hermes": '<tool_call>{"name": "search", "arguments": {"query": ' + json.dumps(LONG) + "}}</tool_call>",
    "llama3_json": '{"name": "search", "parameters": {"query": ' + json.dumps(LONG) + "}}",
    "mistral": '[TOOL_CALLS]search[ARGS]{"query": ' + json.dumps(LONG) + "}",
    "qwen3_coder": "<tool_call>\n<function=search>\n<parameter=query>\n"
    + LONG
    + "\n</parameter>\n</function>",
}


@pytest.mark.parametrize("parser", LONG_OUTPUTS)
def test_a_long_call_fed_a_few_characters_at_a_time_is_read_whole(parser):
    output = LONG_OUTPUTS[parser]
    tool_stream = make_parser(parser).stream()
    deltas = [d for at in range(0, len(output), 3) for d in tool_stream.feed(output[at : at + 3])]
    (call,) = collect_deltas(deltas + tool_stream.finish()).calls
    assert json.loads(call.arguments) == {"query": LONG}


def test_importing_the_parsers_leaves_torch_out():
    assert_imports_without_torch(
        "common.openai_api.tool_calls",
        "common.openai_api.reasoning",
        then="""
            from common.openai_api.tool_calls import get_tool_parser
            assert get_tool_parser("hermes")().extract("hi").content == "hi"
        """,
    )


def test_tool_call_as_the_api_writes_it():
    call = ToolCall(name="get_time", arguments="{}", id="chatcmpl-tool-1")
    assert call.to_dict() == {
        "id": "chatcmpl-tool-1",
        "type": "function",
        "function": {"name": "get_time", "arguments": "{}"},
    }
    assert CALL_ID.fullmatch(ToolCall(name="f", arguments="{}").id)


def test_parsers_are_found_by_vllm_names_and_an_unknown_name_lists_them():
    assert get_tool_parser("llama4_json") is get_tool_parser("llama3_json")
    with pytest.raises(
        ValueError, match=r"unknown --tool-call-parser 'qwen3'; choose one of hermes, llama3_json"
    ):
        get_tool_parser("qwen3")
