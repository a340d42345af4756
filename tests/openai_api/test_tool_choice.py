"""tools and tool_choice are checked as vLLM checks them, "required" and named choices become
output constraints the grammar engine compiles, and their outputs become calls."""

from __future__ import annotations

import copy
import json
import random

import jsonschema
import pytest

from common.openai_api.chat_output import ChatOutputReader
from common.openai_api.tool_calls import (
    ToolChoice,
    collect_deltas,
    forced_calls_parser,
    parse_tool_choice,
    tool_choice_spec,
    validate_tools,
)
from common.openai_api.tool_calls.tool_choice import required_schema
from common.structured_output.validate import validate_spec

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city"],
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": WEATHER_PARAMETERS,
        },
    },
    {"type": "function", "function": {"name": "get_time"}},
]


def schema_of(spec) -> dict:
    assert spec.kind == "json"
    return json.loads(spec.text)


# -- tools ------------------------------------------------------------------------


def test_well_formed_tools_pass():
    assert validate_tools(TOOLS) is TOOLS
    assert validate_tools([{"function": {"name": "f", "parameters": {"type": "object"}}}])  # type defaults


@pytest.mark.parametrize(
    ("tools", "message"),
    [
        ({"type": "function"}, r"tools must be a list of tool definitions like \{\"type\": \"function\""),
        ([], "tools is an empty list; send at least one tool or leave tools out"),
        (["get_weather"], r"tools\[0\] must be an object"),
        (
            [{"type": "retrieval", "function": {"name": "f"}}],
            r"tools\[0\] has type 'retrieval'; only \"function\"",
        ),
        ([{"type": "function"}], r"tools\[0\] has no \"function\" object"),
        (
            [TOOLS[0], {"type": "function", "function": {"name": ""}}],
            r"tools\[1\]\.function needs a non-empty string",
        ),
        (
            [{"type": "function", "function": {"name": "f", "description": 3}}],
            r"tools\[0\] \(f\): description must be a string, got int",
        ),
        (
            [{"type": "function", "function": {"name": "f", "parameters": "object"}}],
            r"tools\[0\] \(f\): parameters must be a JSON schema object, got str",
        ),
        (
            [
                TOOLS[1],
                {"type": "function", "function": {"name": "lookup", "parameters": {"type": "strnig"}}},
            ],
            r"tools\[1\] \(lookup\): parameters: invalid JSON schema: Invalid type: strnig",
        ),
        (
            [{"type": "function", "function": {"name": "lookup", "parameters": {"not": {"type": "string"}}}}],
            r"tools\[0\] \(lookup\): parameters: JSON schema uses keywords the grammar engine does not support",
        ),
    ],
)
def test_malformed_tools_are_refused_naming_the_tool_and_the_problem(tools, message):
    with pytest.raises(ValueError, match=message):
        validate_tools(tools)


# -- tool_choice ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tool_choice", "tools", "expected"),
    [
        (None, TOOLS, ToolChoice("auto")),
        (None, None, ToolChoice("none")),
        ("none", TOOLS, ToolChoice("none")),
        ("none", None, ToolChoice("none")),
        ("auto", TOOLS, ToolChoice("auto")),
        ("required", TOOLS, ToolChoice("required")),
        ({"type": "function", "function": {"name": "get_time"}}, TOOLS, ToolChoice("function", "get_time")),
    ],
)
def test_tool_choice_is_read_as_vllm_reads_it(tool_choice, tools, expected):
    assert parse_tool_choice(tool_choice, tools) == expected


@pytest.mark.parametrize(
    ("tool_choice", "tools", "message"),
    [
        (
            "sometimes",
            TOOLS,
            r"tool_choice 'sometimes' is not supported; use \"none\", \"auto\", \"required\"",
        ),
        ("required", None, r'tool_choice "required" needs tools; send tools or drop tool_choice'),
        ("auto", None, r'tool_choice "auto" needs tools'),
        (5, TOOLS, "tool_choice must be .* got int"),
        ({"type": "function", "function": {}}, TOOLS, "tool_choice names no function"),
        ({"type": "function", "name": "get_time"}, TOOLS, "tool_choice names no function"),
        ({"type": "custom", "function": {"name": "get_time"}}, TOOLS, "tool_choice has type 'custom'"),
        (
            {"type": "function", "function": {"name": "get_wether"}},
            TOOLS,
            r"tool_choice names the function 'get_wether', which is not among the tools "
            r"\(get_weather, get_time\); name one of them",
        ),
        ({"type": "function", "function": {"name": "get_time"}}, None, "no tools were sent"),
    ],
)
def test_a_bad_tool_choice_is_refused_saying_why(tool_choice, tools, message):
    with pytest.raises(ValueError, match=message):
        parse_tool_choice(tool_choice, tools)


# -- the constraints ------------------------------------------------------------------------


def test_none_and_auto_constrain_nothing():
    assert tool_choice_spec(ToolChoice("none"), TOOLS) is None
    assert tool_choice_spec(ToolChoice("auto"), TOOLS) is None
    assert not ToolChoice("auto").constrained and ToolChoice("required").constrained


def test_required_is_vllms_array_of_named_calls():
    assert schema_of(tool_choice_spec(ToolChoice("required"), TOOLS)) == {
        "type": "array",
        "minItems": 1,
        "items": {
            "type": "object",
            "anyOf": [
                {
                    "properties": {
                        "name": {"type": "string", "enum": ["get_weather"]},
                        "parameters": WEATHER_PARAMETERS,
                    },
                    "required": ["name", "parameters"],
                },
                {
                    "properties": {
                        "name": {"type": "string", "enum": ["get_time"]},
                        "parameters": {"type": "object", "properties": {}},
                    },
                    "required": ["name", "parameters"],
                },
            ],
        },
    }


@pytest.mark.parametrize("parallel_tool_calls", [True, False])
def test_required_compiles_and_admits_exactly_calls_to_the_tools(parallel_tool_calls):
    spec = tool_choice_spec(ToolChoice("required"), TOOLS, parallel_tool_calls=parallel_tool_calls)
    validate_spec(spec)
    schema = schema_of(spec)
    one = [{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}]
    two = one + [{"name": "get_time", "parameters": {}}]
    jsonschema.validate(one, schema)
    for wrong in (
        [],
        [{"name": "get_date", "parameters": {}}],
        [{"name": "get_weather", "parameters": {"city": 7}}],
        [{"name": "get_weather", "parameters": {"unit": "kelvin", "city": "Oslo"}}],
        [{"name": "get_weather"}],
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, schema)
    if parallel_tool_calls:
        jsonschema.validate(two, schema)
        assert "maxItems" not in schema
    else:
        assert schema["maxItems"] == 1
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(two, schema)


def test_a_named_function_constrains_the_output_to_its_parameters():
    spec = tool_choice_spec(
        parse_tool_choice({"type": "function", "function": {"name": "get_weather"}}, TOOLS), TOOLS
    )
    validate_spec(spec)
    assert schema_of(spec) == WEATHER_PARAMETERS
    jsonschema.validate({"city": "Paris"}, schema_of(spec))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"unit": "celsius"}, schema_of(spec))


def test_a_named_function_without_parameters_takes_an_object():
    spec = tool_choice_spec(ToolChoice("function", "get_time"), TOOLS)
    validate_spec(spec)
    assert schema_of(spec) == {"type": "object", "properties": {}}


def test_required_gathers_the_tools_definitions_where_their_references_resolve():
    address = {"type": "object", "properties": {"street": {"type": "string"}}, "required": ["street"]}
    tools = [
        {
            "type": "function",
            "function": {
                "name": "ship",
                "parameters": {
                    "type": "object",
                    "properties": {"to": {"$ref": "#/$defs/Address"}},
                    "required": ["to"],
                    "$defs": {"Address": address},
                },
            },
        },
        {
            "type": "function",
            "function": {
                "name": "bill",
                "parameters": {
                    "type": "object",
                    "properties": {"to": {"$ref": "#/$defs/Address"}},
                    "$defs": {"Address": address},
                },
            },
        },
    ]
    original = copy.deepcopy(tools)
    validate_tools(tools)
    spec = tool_choice_spec(ToolChoice("required"), tools)
    validate_spec(spec)
    schema = schema_of(spec)
    assert schema["$defs"] == {"Address": address}
    jsonschema.validate([{"name": "ship", "parameters": {"to": {"street": "Rue de Rivoli"}}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "ship", "parameters": {"to": {"city": "Paris"}}}], schema)
    assert tools == original  # the request's tools are left as sent

    tools[1]["function"]["parameters"]["$defs"]["Address"] = {"type": "string"}
    with pytest.raises(
        ValueError, match=r"tools define '\$defs/Address' differently \(bill and another tool\)"
    ):
        required_schema(tools)


# -- reading the constrained output back ------------------------------------------------------


def chunked(parser, text: str, seed: int):
    rng = random.Random(seed)
    stream, deltas, at = parser.stream(), [], 0
    while at < len(text):
        size = rng.randint(1, 6)
        deltas += stream.feed(text[at : at + size])
        at += size
    return collect_deltas(deltas + stream.finish())


def calls_of(result):
    return result.content, [(call.name, call.arguments) for call in result.calls]


def test_a_named_functions_output_is_its_arguments_as_written():
    parser = forced_calls_parser(ToolChoice("function", "get_weather"))
    output = '{ "city": "Zürich",\n  "unit": "celsius" }'
    result = parser.extract(output)
    assert calls_of(result) == (None, [("get_weather", output)])
    for seed in range(5):
        assert calls_of(chunked(parser, output, seed)) == calls_of(result)
    assert calls_of(parser.extract("")) == (None, [("get_weather", "")])


def test_the_first_named_function_piece_carries_the_name():
    stream = forced_calls_parser(ToolChoice("function", "get_weather")).stream()
    header, piece = stream.feed('{"city"')
    assert header.to_dict() == {
        "index": 0,
        "id": header.id,
        "type": "function",
        "function": {"name": "get_weather"},
    }
    assert piece.to_dict() == {"index": 0, "function": {"arguments": '{"city"'}}
    assert [d.to_dict() for d in stream.feed(': "Oslo"}')] == [
        {"index": 0, "function": {"arguments": ': "Oslo"}'}}
    ]


REQUIRED_OUTPUTS = {
    "one call": (
        '[{"name": "get_weather", "parameters": {"city": "東京", "unit": "celsius"}}]',
        None,
        [("get_weather", '{"city": "東京", "unit": "celsius"}')],
    ),
    "two calls, free whitespace": (
        '[\n  {"name":"get_weather","parameters":{"city":"Paris"}} ,\n'
        '  { "name" : "get_time" , "parameters" : \n {} }\n]\n',
        None,
        [("get_weather", '{"city":"Paris"}'), ("get_time", "{}")],
    ),
    "brackets inside strings": (
        r'[{"name": "search", "parameters": {"q": "} ]\"{", "at": {"page": [1, {"n": 2}]}}}]',
        None,
        [("search", r'{"q": "} ]\"{", "at": {"page": [1, {"n": 2}]}}')],
    ),
    "a name with escapes": (
        r'[{"name": "get_\u0074ime", "parameters": {}}]',
        None,
        [("get_time", "{}")],
    ),
    "cut short by max_tokens inside the arguments": (
        '[{"name": "get_time", "parameters": {}}, {"name": "get_weather", "parameters": {"ci',
        None,
        [("get_time", "{}"), ("get_weather", '{"ci')],
    ),
    "cut short before the parameters": (
        '[{"name": "get_time", "parameters": {}}, {"name": "get_weather", "param',
        None,
        [("get_time", "{}"), ("get_weather", "")],
    ),
    "cut short after the parameters": (
        '[{"name": "get_weather", "parameters": {"city": "Oslo"} ',
        None,
        [("get_weather", '{"city": "Oslo"}')],
    ),
    "cut short before the name closed": (
        '[{"name": "get_time", "parameters": {}}, {"name": "get_wea',
        ', {"name": "get_wea',
        [("get_time", "{}")],
    ),
    "not a list": ('{"name": "get_time"}', '{"name": "get_time"}', []),
    "an empty list": ("[]", "[]", []),
    "parameters that are not an object": (
        '[{"name": "get_time", "parameters": {}}, {"name": "f", "parameters": 3}]',
        ', "parameters": 3}]',
        [("get_time", "{}"), ("f", "")],
    ),
    "parameters before the name": (
        '[{"parameters": {}, "name": "get_time"}]',
        '[{"parameters": {}, "name": "get_time"}]',
        [],
    ),
}


def one_char_at_a_time(parser, text: str):
    stream = parser.stream()
    deltas = [delta for char in text for delta in stream.feed(char)]
    return collect_deltas(deltas + stream.finish())


@pytest.mark.parametrize("name", REQUIRED_OUTPUTS)
def test_required_output_becomes_calls_with_the_parameters_as_written(name):
    output, content, calls = REQUIRED_OUTPUTS[name]
    parser = forced_calls_parser(ToolChoice("required"))
    result = parser.extract(output)
    assert calls_of(result) == (content, calls)
    assert calls_of(one_char_at_a_time(parser, output)) == calls_of(result)
    for seed in range(8):
        assert calls_of(chunked(parser, output, seed)) == calls_of(result)


LONG_PARAMETERS = json.dumps({"query": "weather " * 200, "filters": {"days": [1, 2, 3], "unit": "celsius"}})


def test_required_arguments_stream_in_pieces_before_the_item_closes():
    head = '[{"name": "search", "parameters": \n '
    stream = forced_calls_parser(ToolChoice("required")).stream()
    assert stream.feed(head[:14]) == []
    (header,) = stream.feed(head[14:18])  # the name has closed: the call begins
    assert head[:18] == '[{"name": "search"'
    assert header.to_dict() == {
        "index": 0,
        "id": header.id,
        "type": "function",
        "function": {"name": "search"},
    }
    assert stream.feed(head[18:]) == []  # the space before "{" is not part of the arguments
    deltas = []
    for at in range(0, len(LONG_PARAMETERS) - 1, 7):
        deltas += stream.feed(LONG_PARAMETERS[at : min(at + 7, len(LONG_PARAMETERS) - 1)])
    assert len(deltas) > 50 and all(d.index == 0 and d.name is None for d in deltas)
    # every piece fed so far went out: nothing is held back but the closing brace not yet written
    assert "".join(d.arguments for d in deltas) == LONG_PARAMETERS[:-1]
    assert [d.arguments for d in stream.feed("}")] == ["}"]
    second = stream.feed('}, {"name": "get_time", "parameters": {}}]') + stream.finish()
    assert [d.to_dict() for d in second] == [
        {"index": 1, "id": second[0].id, "type": "function", "function": {"name": "get_time"}},
        {"index": 1, "function": {"arguments": "{}"}},
    ]


def test_required_arguments_ending_in_a_backslash_go_out_before_the_escaped_character():
    stream = forced_calls_parser(ToolChoice("required")).stream()
    header, piece = stream.feed('[{"name": "f", "parameters": {"q": "a\\')
    assert (header.name, piece.arguments) == ("f", '{"q": "a\\')
    assert [d.arguments for d in stream.feed('"}')] == ['"}']  # an escaped quote: still inside the string
    assert [d.arguments for d in stream.feed('"}}]')] == ['"}']
    assert stream.finish() == []


@pytest.mark.parametrize("seed", range(6))
def test_required_streamed_in_random_pieces_reads_as_the_whole_output(seed):
    rng = random.Random(seed)
    items = [
        {
            "name": rng.choice(["get_weather", "get_time", "search"]),
            "parameters": {"q": 'x\\"{}' * rng.randint(0, 30)},
        }
        for _ in range(rng.randint(1, 4))
    ]
    output = json.dumps(items, indent=rng.choice([None, 2]))
    parser = forced_calls_parser(ToolChoice("required"))
    result = chunked(parser, output, seed)
    assert calls_of(result) == calls_of(parser.extract(output))
    assert [(name, json.loads(arguments)) for name, arguments in calls_of(result)[1]] == [
        (item["name"], item["parameters"]) for item in items
    ]
    for cut in (len(output) // 3, len(output) // 2, len(output) - 2):
        assert calls_of(chunked(parser, output[:cut], seed)) == calls_of(parser.extract(output[:cut]))


def test_a_required_choice_cut_by_max_tokens_keeps_its_calls_and_finishes_as_length():
    reader = ChatOutputReader(tools=forced_calls_parser(ToolChoice("required")), forced=True)
    output = '[{"name": "get_time", "parameters": {}}, {"name": "get_weather", "parameters": {"city": "Os'
    parts, finish_reason = reader.read(output, "length")
    assert finish_reason == "length" and parts.content is None
    assert [(c.name, c.arguments) for c in parts.tool_calls] == [
        ("get_time", "{}"),
        ("get_weather", '{"city": "Os'),
    ]
    stream = reader.stream()
    pieces = [stream.feed(output[at : at + 5]) for at in range(0, len(output), 5)] + [
        stream.feed("", final=True)
    ]
    streamed = collect_deltas(call for piece in pieces for call in piece.tool_calls)
    assert calls_of(streamed) == (None, [(c.name, c.arguments) for c in parts.tool_calls])
    assert all(piece.content is None for piece in pieces)
    assert stream.finish_reason("length") == "length"


def test_auto_and_none_have_no_forced_reader():
    assert forced_calls_parser(ToolChoice("auto")) is None
    assert forced_calls_parser(ToolChoice("none")) is None
