"""Checking a spec before any worker sees it: each bad spec is a ValueError whose message
names the problem, and the check runs without torch (the router calls it)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from common.structured_output.spec import StructuredOutputSpec
from common.structured_output.validate import close_objects, validate_spec

VALID = [
    StructuredOutputSpec("json", json.dumps({"type": "object", "properties": {"a": {"type": "string"}}})),
    StructuredOutputSpec("json_object"),
    StructuredOutputSpec("regex", r"\d{3}-\d{4}"),
    StructuredOutputSpec("choice", '["a", "b"]'),
    StructuredOutputSpec("grammar", 'start: "x" NUM\nNUM: /[0-9]+/'),
    StructuredOutputSpec("grammar", 'root ::= "yes" | "no"'),
    StructuredOutputSpec(
        "structural_tag",
        json.dumps(
            {
                "structures": [{"begin": "<function=f>", "schema": {"type": "object"}, "end": "</function>"}],
                "triggers": ["<function="],
            }
        ),
    ),
]


@pytest.mark.parametrize("spec", VALID, ids=lambda s: s.kind)
def test_valid_specs_pass(spec):
    assert validate_spec(spec)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (StructuredOutputSpec("json", '{"type": '), r"invalid JSON schema: the schema is not JSON"),
        (
            StructuredOutputSpec("json", "[1, 2]"),
            r"invalid JSON schema: a schema is a JSON object or boolean",
        ),
        (StructuredOutputSpec("json", '{"type": "strin"}'), r"invalid JSON schema: .*strin"),
        (StructuredOutputSpec("json", '{"$ref": "#/$defs/nope"}'), r"invalid JSON schema: .*/\$defs/nope"),
        (
            StructuredOutputSpec("json", '{"type": "string", "minLength": 5, "maxLength": 2}'),
            r"invalid JSON schema: .*minLength",
        ),
        (
            StructuredOutputSpec("json", '{"type": "array", "uniqueItems": true}'),
            r"keywords the grammar engine does not support: \[\"uniqueItems\"\]",
        ),
        (StructuredOutputSpec("regex", "a(b"), r"invalid regex: .*unclosed group"),
        (StructuredOutputSpec("grammar", "start: foo"), r"grammar syntax error: .*unknown name: \"foo\""),
        (
            StructuredOutputSpec("grammar", 'root ::= "a" | foo'),
            r"grammar syntax error: .*Rule 'foo' not found",
        ),
        (StructuredOutputSpec("grammar", "  "), r"grammar syntax error: the grammar is empty"),
        (StructuredOutputSpec("choice", "[]"), r"invalid choice: send a non-empty list of strings"),
        (StructuredOutputSpec("structural_tag", '{"structures": []}'), r"invalid structural tag: send"),
        (
            StructuredOutputSpec(
                "structural_tag",
                '{"structures": [{"begin": "<x>", "schema": {}, "end": "</x>"}], "triggers": ["<y"]}',
            ),
            r"invalid structural tag: structures\[0\]\.begin '<x>' starts with none of the triggers",
        ),
    ],
)
def test_bad_specs_raise_naming_the_problem(spec, message):
    with pytest.raises(ValueError, match="(?s)" + message):
        validate_spec(spec)


def test_close_objects_closes_every_object_that_leaves_it_open():
    schema = {
        "type": "object",
        "properties": {
            "inner": {"type": "object", "properties": {"x": {}}},
            "open": {"type": "object", "additionalProperties": True},
        },
        "$defs": {"p": {"properties": {"y": {}}}},
    }
    closed = close_objects(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["inner"]["additionalProperties"] is False
    assert closed["properties"]["open"]["additionalProperties"] is True
    assert closed["$defs"]["p"]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # the caller's schema is left alone


def test_validation_and_the_grammar_cache_load_no_torch():
    code = (
        "import sys\n"
        "import common.structured_output.validate, common.structured_output.grammar_cache\n"
        "from common.structured_output.spec import StructuredOutputSpec\n"
        "common.structured_output.validate.validate_spec(StructuredOutputSpec('regex', 'a+'))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
