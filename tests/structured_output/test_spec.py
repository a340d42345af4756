"""StructuredOutputSpec: vLLM's structured_outputs fields and OpenAI's response_format
become one kind and one canonical text."""

from __future__ import annotations

import json

import pytest

from common.structured_output.spec import StructuredOutputSpec


def test_no_constraint_gives_no_spec():
    assert StructuredOutputSpec.from_params() is None
    assert StructuredOutputSpec.from_params(json_object=False) is None
    assert StructuredOutputSpec.from_response_format({"type": "text"}) is None


@pytest.mark.parametrize(
    ("fields", "kind", "text"),
    [
        (
            {"json": {"type": "object", "properties": {"b": {}, "a": {}}}},
            "json",
            '{"type":"object","properties":{"b":{},"a":{}}}',
        ),
        ({"json": '{"type": "string"}'}, "json", '{"type": "string"}'),
        ({"regex": "[a-z]+"}, "regex", "[a-z]+"),
        ({"choice": ["yes", "no"]}, "choice", '["yes","no"]'),
        ({"grammar": 'start: "a"'}, "grammar", 'start: "a"'),
        ({"json_object": True}, "json_object", ""),
        (
            {"structural_tag": {"structures": [], "triggers": []}},
            "structural_tag",
            '{"structures":[],"triggers":[]}',
        ),
    ],
)
def test_each_field_becomes_its_kind_with_key_order_kept(fields, kind, text):
    spec = StructuredOutputSpec.from_params(**fields)
    assert (spec.kind, spec.text) == (kind, text)


def test_more_than_one_constraint_is_refused_naming_them():
    with pytest.raises(ValueError, match="choice, regex; set exactly one"):
        StructuredOutputSpec.from_params(regex="a", choice=["a"])


@pytest.mark.parametrize("choice", [[], ["a", 1], "abc"])
def test_choice_must_be_a_non_empty_list_of_strings(choice):
    with pytest.raises(ValueError, match="non-empty list of strings"):
        StructuredOutputSpec.from_params(choice=choice)


def test_options_are_part_of_the_cache_key():
    plain = StructuredOutputSpec.from_params(json={"type": "object"})
    closed = StructuredOutputSpec.from_params(json={"type": "object"}, disable_additional_properties=True)
    assert plain.cache_key != closed.cache_key
    assert plain.cache_key == StructuredOutputSpec.from_params(json={"type": "object"}).cache_key


def test_response_format_json_schema_and_json_object():
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}}
    spec = StructuredOutputSpec.from_response_format(
        {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    )
    assert spec.kind == "json" and json.loads(spec.text) == schema
    assert StructuredOutputSpec.from_response_format({"type": "json_object"}).kind == "json_object"


def test_response_format_without_a_schema_or_of_unknown_type_is_refused():
    with pytest.raises(ValueError, match="needs json_schema"):
        StructuredOutputSpec.from_response_format({"type": "json_schema"})
    with pytest.raises(ValueError, match="'yaml' is not supported"):
        StructuredOutputSpec.from_response_format({"type": "yaml"})


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown structured output kind 'xml'"):
        StructuredOutputSpec("xml", "")  # type: ignore[arg-type]
