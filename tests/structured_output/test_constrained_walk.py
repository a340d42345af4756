"""Each kind of constraint holds on the real SmolLM2 tokenizer: a masked greedy walk over
random logits writes text that is valid under the schema, matches the regex, is one of
the choices, parses under the grammar."""

from __future__ import annotations

import json
import re

import pytest
from structured_checks import assert_valid_json

from common.structured_output.spec import StructuredOutputSpec

STR, INT, NUM = {"type": "string"}, {"type": "integer"}, {"type": "number"}


def _obj(props, required=None, **extra):
    return {
        "type": "object",
        "properties": props,
        "required": list(props) if required is None else required,
        **extra,
    }


SCHEMAS = {
    "nested": _obj(
        {
            "user": _obj(
                {
                    "name": STR,
                    "address": _obj({"city": STR, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}),
                }
            )
        }
    ),
    "array bounds": _obj({"xs": {"type": "array", "items": INT, "minItems": 2, "maxItems": 4}}),
    "array of objects": {
        "type": "array",
        "items": _obj({"sku": STR, "qty": INT}),
        "minItems": 1,
        "maxItems": 3,
    },
    "enum and const": _obj({"color": {"enum": ["red", "green", "blue"]}, "kind": {"const": "event"}}),
    "anyOf": _obj({"value": {"anyOf": [INT, {"type": "null"}, _obj({"s": STR})]}}),
    "oneOf": _obj(
        {
            "shape": {
                "oneOf": [
                    _obj({"r": NUM}, additionalProperties=False),
                    _obj({"w": NUM, "h": NUM}, additionalProperties=False),
                ]
            }
        }
    ),
    "formats": _obj({f: {"type": "string", "format": f} for f in ("date-time", "date", "email", "uuid")}),
    "string length": _obj({"s": {"type": "string", "minLength": 3, "maxLength": 8}}),
    "number bounds": _obj(
        {
            "n": {"type": "integer", "minimum": -5, "maximum": 500},
            "x": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
        }
    ),
    "optional and closed": _obj({"id": INT, "nick": STR}, required=["id"], additionalProperties=False),
    "$ref/$defs": {
        "$defs": {"pt": _obj({"x": NUM, "y": NUM})},
        **_obj({"a": {"$ref": "#/$defs/pt"}, "b": {"$ref": "#/$defs/pt"}}),
    },
    "recursive": {
        "$defs": {
            "node": _obj(
                {"v": INT, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}}
            )
        },
        "$ref": "#/$defs/node",
    },
}


@pytest.mark.parametrize("name", list(SCHEMAS))
@pytest.mark.parametrize("seed", [0, 1])
def test_json_schema_output_is_valid_under_the_schema(masked_walk, name, seed):
    schema = SCHEMAS[name]
    text = masked_walk(StructuredOutputSpec.from_params(json=schema), seed)
    assert_valid_json(text, schema)


def test_compact_json_has_no_whitespace_between_tokens(masked_walk):
    schema = _obj({"a": INT, "b": {"type": "array", "items": INT, "minItems": 2, "maxItems": 2}})
    text = masked_walk(StructuredOutputSpec.from_params(json=schema, disable_any_whitespace=True))
    assert_valid_json(text, schema)
    assert text == json.dumps(json.loads(text), separators=(",", ":"))


def test_closed_objects_write_only_declared_properties(masked_walk):
    schema = _obj({"a": INT}, required=[])
    for seed in range(3):
        text = masked_walk(
            StructuredOutputSpec.from_params(json=schema, disable_additional_properties=True), seed
        )
        assert set(json.loads(text)) <= {"a"}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_object_output_is_an_object(masked_walk, seed):
    assert isinstance(json.loads(masked_walk(StructuredOutputSpec("json_object"), seed)), dict)


@pytest.mark.parametrize(
    "pattern", [r"\(\d{3}\) \d{3}-\d{4}", r"[a-z]{1,8}@[a-z]{1,8}\.(com|org)", r"(yes|no)!?"]
)
@pytest.mark.parametrize("seed", [0, 1])
def test_regex_output_matches(masked_walk, pattern, seed):
    assert re.fullmatch(pattern, masked_walk(StructuredOutputSpec("regex", pattern), seed))


def test_choice_output_is_one_of_the_choices(masked_walk):
    choices = ["positive", "negative", "neutral", "mixed feelings"]
    spec = StructuredOutputSpec.from_params(choice=choices)
    outputs = {masked_walk(spec, seed) for seed in range(8)}
    assert outputs <= set(choices)


def test_lark_grammar_output_parses(masked_walk):
    grammar = 'start: expr\nexpr: NUMBER | "(" expr OP expr ")"\nOP: "+" | "*"\nNUMBER: /[0-9]{1,3}/'
    for seed in range(3):
        text = masked_walk(StructuredOutputSpec("grammar", grammar), seed)
        # Reduce innermost "(a op b)" to a number until one number is left.
        while (reduced := re.sub(r"\([0-9]+[+*][0-9]+\)", "0", text)) != text:
            text = reduced
        assert re.fullmatch(r"[0-9]{1,3}", text), text


def test_gbnf_grammar_output_parses(masked_walk):
    grammar = 'root ::= "yes" | "no" | "maybe " num\nnum ::= [0-9] [0-9]?'
    for seed in range(3):
        assert re.fullmatch(
            r"yes|no|maybe [0-9]{1,2}", masked_walk(StructuredOutputSpec("grammar", grammar), seed)
        )
