"""The fields that constrain a completion's output (response_format, structured_outputs,
guided_*): which spec each form gives the engine, the server's defaults for the switches,
and the 400 that names the field when the constraint is malformed, doubled or refused."""

from __future__ import annotations

import json
import uuid
from dataclasses import replace

import pytest

from common.config.structured_outputs_config import StructuredOutputsConfig
from common.openai_api import (
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIError,
    prepare_chat,
    prepare_completion,
)
from common.structured_output.spec import StructuredOutputSpec
from common.structured_output.validation_cache import shared_cache

HELLO = [{"role": "user", "content": "Hello!"}]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}}
SCHEMA_TEXT = '{"type":"object","properties":{"name":{"type":"string"},"age":{"type":"integer"}}}'
TAG = {"structures": [{"begin": "<f>", "schema": SCHEMA, "end": "</f>"}], "triggers": ["<f"]}


def completion_spec(served, **body) -> StructuredOutputSpec | None:
    prepared = prepare_completion(CompletionRequest.parse({"prompt": "Once upon a time", **body}), served)
    specs = {seq.sampling_params.structured_outputs for seq in prepared.sequences}
    assert len(specs) == 1  # every choice of the request carries the one spec
    return specs.pop()


def chat_spec(served, **body) -> StructuredOutputSpec | None:
    prepared = prepare_chat(ChatCompletionRequest.parse({"messages": HELLO, **body}), served)
    return prepared.sequences[0].sampling_params.structured_outputs


def refusal(served, **body) -> OpenAIError:
    with pytest.raises(OpenAIError) as caught:
        completion_spec(served, **body)
    assert caught.value.status == 400 and caught.value.type == "BadRequestError"
    return caught.value


FORMS = [
    ({"response_format": {"type": "json_object"}}, StructuredOutputSpec("json_object")),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}},
        StructuredOutputSpec("json", SCHEMA_TEXT),
    ),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA, "strict": True}}},
        StructuredOutputSpec("json", SCHEMA_TEXT),
    ),
    ({"response_format": {"type": "structural_tag", **TAG}}, StructuredOutputSpec("structural_tag", json.dumps(TAG, separators=(",", ":")))),
    ({"structured_outputs": {"json": SCHEMA}}, StructuredOutputSpec("json", SCHEMA_TEXT)),
    ({"structured_outputs": {"json": SCHEMA_TEXT}}, StructuredOutputSpec("json", SCHEMA_TEXT)),
    ({"structured_outputs": {"regex": "[0-9]{3}"}}, StructuredOutputSpec("regex", "[0-9]{3}")),
    ({"structured_outputs": {"choice": ["yes", "no"]}}, StructuredOutputSpec("choice", '["yes","no"]')),
    ({"structured_outputs": {"grammar": 'start: "a" | "b"'}}, StructuredOutputSpec("grammar", 'start: "a" | "b"')),
    ({"structured_outputs": {"json_object": True}}, StructuredOutputSpec("json_object")),
    ({"structured_outputs": {"structural_tag": TAG}}, StructuredOutputSpec("structural_tag", json.dumps(TAG, separators=(",", ":")))),
    ({"guided_json": SCHEMA}, StructuredOutputSpec("json", SCHEMA_TEXT)),
    ({"guided_regex": "[0-9]{3}"}, StructuredOutputSpec("regex", "[0-9]{3}")),
    ({"guided_choice": ["yes", "no"]}, StructuredOutputSpec("choice", '["yes","no"]')),
    ({"guided_grammar": 'root ::= "a" | "b"'}, StructuredOutputSpec("grammar", 'root ::= "a" | "b"')),
]  # fmt: skip


@pytest.mark.parametrize(
    ("body", "spec"), FORMS, ids=[next(iter(b)) + f"-{i}" for i, (b, _) in enumerate(FORMS)]
)
def test_each_field_form_gives_the_engine_its_spec(served, body, spec):
    assert completion_spec(served, **body) == spec
    assert chat_spec(served, **body) == spec


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"response_format": {"type": "text"}},
        {"response_format": None, "structured_outputs": None, "guided_json": None},
        {"guided_decoding_backend": "xgrammar"},  # a backend without a constraint constrains nothing
    ],
)
def test_without_a_constraint_the_output_is_free_text(served, body):
    assert completion_spec(served, **body) is None
    assert chat_spec(served, **body) is None


def test_n_samples_and_several_prompts_share_the_spec(served):
    assert completion_spec(served, prompt=["a", "b"], n=3, seed=7, guided_regex="x+") == StructuredOutputSpec(
        "regex", "x+"
    )


def test_the_schema_keeps_the_clients_property_order(served):
    schema = {"type": "object", "properties": {"zeta": {"type": "string"}, "alpha": {"type": "string"}}}
    spec = completion_spec(served, structured_outputs={"json": schema})
    assert spec.text.index("zeta") < spec.text.index("alpha")


def test_the_servers_switches_apply_when_the_request_leaves_them_out(served):
    strict = replace(
        served,
        structured_outputs=StructuredOutputsConfig(
            disable_any_whitespace=True, disable_additional_properties=True
        ),
    )
    for body in (
        {"response_format": {"type": "json_object"}},
        {"guided_json": SCHEMA},
        {"structured_outputs": {"regex": "a"}},
    ):
        spec = completion_spec(strict, **body)
        assert (spec.disable_any_whitespace, spec.disable_additional_properties) == (True, True), body
    assert completion_spec(served, guided_json=SCHEMA).disable_any_whitespace is False


def test_the_requests_switches_win_and_apply_to_any_field_that_carries_the_constraint(served):
    strict = replace(served, structured_outputs=StructuredOutputsConfig(disable_any_whitespace=True))
    spec = completion_spec(
        strict,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}},
        structured_outputs={"disable_any_whitespace": False, "disable_additional_properties": True},
    )
    assert spec == StructuredOutputSpec(
        "json", SCHEMA_TEXT, disable_any_whitespace=False, disable_additional_properties=True
    )
    spec = completion_spec(served, guided_choice=["a"], structured_outputs={"disable_any_whitespace": True})
    assert spec == StructuredOutputSpec("choice", '["a"]', disable_any_whitespace=True)


def test_a_backend_that_selects_the_servers_own_engine_and_disable_fallback_are_accepted(served):
    for backend in ("auto", "guidance"):
        assert completion_spec(
            served, structured_outputs={"json_object": True, "backend": backend, "disable_fallback": True}
        )
        assert completion_spec(served, guided_regex="a", guided_decoding_backend=backend)


BAD = [
    # (body, param the error names, words of the message)
    ({"structured_outputs": {"json": {"type": "object", "properties": 5}}}, "structured_outputs.json", "invalid JSON schema"),
    ({"guided_json": {"type": "object", "properties": 5}}, "guided_json", "invalid JSON schema"),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json", "invalid JSON schema: the schema is not JSON"),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "array", "uniqueItems": True}}}},
        "response_format",
        "JSON schema uses keywords the grammar engine does not support: [\"uniqueItems\"]",
    ),
    ({"structured_outputs": {"regex": "a("}}, "structured_outputs.regex", "invalid regex"),
    ({"guided_regex": "a("}, "guided_regex", "invalid regex"),
    ({"structured_outputs": {"grammar": "start: ("}}, "structured_outputs.grammar", "grammar syntax error"),
    ({"guided_grammar": ""}, "guided_grammar", "grammar syntax error: the grammar is empty"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice", "structured_outputs.choice is an empty list"),
    ({"guided_choice": []}, "guided_choice", "guided_choice is an empty list"),
    (
        {"response_format": {"type": "structural_tag", "structures": [{"begin": "<a>", "end": "</a>"}], "triggers": ["<b"]}},
        "response_format",
        "invalid structural tag",
    ),
    ({"response_format": {"type": "yaml"}}, "response_format", "type must be one of 'text', 'json_object', 'json_schema', 'structural_tag'"),
    ({"response_format": {"type": {"not": "a string"}}}, "response_format", "type must be one of"),
    ({"response_format": "json_object"}, "response_format", "valid dictionary"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}}, "response_format", "json_schema.name: Field required"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p"}}}, "response_format", "json_schema.schema: Field required"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema: Field required"),
    ({"structured_outputs": {"regex": 5}}, "structured_outputs.regex", "valid string"),
    ({"structured_outputs": {}}, "structured_outputs", "structured_outputs sets no constraint"),
    ({"structured_outputs": {"json_object": False}}, "structured_outputs", "sets no constraint"),
    (
        {"structured_outputs": {"json_object": True, "whitespace_pattern": "[ ]?"}},
        "structured_outputs.whitespace_pattern",
        "structured_outputs.whitespace_pattern is not supported",
    ),
    ({"guided_json": SCHEMA, "guided_whitespace_pattern": " "}, "guided_whitespace_pattern", "guided_whitespace_pattern is not supported"),
    (
        {"structured_outputs": {"json_object": True, "backend": "xgrammar"}},
        "structured_outputs.backend",
        "request-level structured output backend selection is not supported",
    ),
    ({"guided_json": SCHEMA, "guided_decoding_backend": "outlines"}, "guided_decoding_backend", "drop guided_decoding_backend"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "param", "words"), BAD, ids=[f"{p}-{i}" for i, (_, p, _) in enumerate(BAD)])
def test_a_bad_constraint_is_a_400_naming_its_field_and_the_problem(served, body, param, words):
    error = refusal(served, **body)
    assert error.param == param
    assert words in error.message, error.message


@pytest.mark.parametrize(
    ("body", "names"),
    [
        ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, ["response_format", "guided_regex"]),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}, "structured_outputs": {"regex": "a"}},
            ["response_format", "structured_outputs.regex"],
        ),
        ({"structured_outputs": {"json": SCHEMA, "choice": ["a"]}}, ["structured_outputs.json", "structured_outputs.choice"]),
        ({"guided_json": SCHEMA, "guided_choice": ["a"], "guided_grammar": "start: \"a\""}, ["guided_json", "guided_choice", "guided_grammar"]),
    ],
)  # fmt: skip
def test_two_constraints_at_once_are_a_400_naming_each(served, body, names):
    error = refusal(served, **body)
    assert all(name in error.message for name in names), error.message
    assert "constrain the output" in error.message and error.param == names[0]


def test_a_popular_schema_is_checked_by_the_grammar_engine_once(served):
    cache = shared_cache()
    schema = {"type": "object", "title": uuid.uuid4().hex, "properties": {"a": {"type": "integer"}}}
    misses = cache.misses
    for _ in range(5):
        completion_spec(served, guided_json=schema)
        chat_spec(
            served, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
        )
    assert cache.misses == misses + 1
    bad = {"type": "object", "title": uuid.uuid4().hex, "properties": 5}
    for _ in range(3):
        assert "invalid JSON schema" in refusal(served, guided_json=bad).message
    assert cache.misses == misses + 2  # the refusal is remembered too
