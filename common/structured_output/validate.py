"""Turning a spec into the grammar engine's grammar, and refusing one that cannot be.

The engine is llguidance (vLLM's "guidance" backend): its grammars are built from text
alone, without a tokenizer and without torch, so the router checks every spec here and
answers 400 with the engine's own words before any worker sees the request. Workers
build the same grammar text and compile it against their tokenizer (grammar_cache.py).

Each error names the kind and what is wrong with it: "invalid JSON schema", "JSON schema
uses keywords the grammar engine does not support", "invalid regex", "grammar syntax
error", "invalid choice", "invalid structural tag".
"""

from __future__ import annotations

import json
from typing import Any

import llguidance

from common.structured_output.spec import StructuredOutputSpec

_UNSUPPORTED_PREFIX = "Unimplemented keys"


def engine_grammar(spec: StructuredOutputSpec) -> str:
    """llguidance's serialized grammar for `spec`; ValueError when the spec is malformed.

    Only what can be seen without compiling is checked here; validate_spec checks all.
    """
    if spec.kind == "json":
        return _json_grammar(_parse_schema(spec.text), spec)
    if spec.kind == "json_object":
        return _json_grammar({"type": "object"}, spec)
    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.text)
    if spec.kind == "choice":
        return llguidance.LLMatcher.grammar_from_lark(_choice_lark(spec.text))
    if spec.kind == "grammar":
        if not spec.text.strip():
            raise ValueError("grammar syntax error: the grammar is empty; send a Lark or GBNF grammar")
        try:
            return llguidance.grammar_from("grammar", spec.text)
        except ValueError as exc:  # GBNF that does not convert to Lark
            raise ValueError(f"grammar syntax error: {exc}") from None
    return _structural_tag_grammar(spec.text)


def validate_spec(spec: StructuredOutputSpec) -> str:
    """The engine grammar for `spec` after checking it compiles; ValueError naming the problem."""
    grammar = engine_grammar(spec)
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise ValueError(_explain(spec, error.strip()))
    return grammar


def _explain(spec: StructuredOutputSpec, error: str) -> str:
    if spec.kind in ("json", "json_object"):
        if error.startswith(_UNSUPPORTED_PREFIX):
            keys = error.partition(":")[2].strip()
            return (
                f"JSON schema uses keywords the grammar engine does not support: {keys}; "
                "remove them or express the constraint another way"
            )
        return f"invalid JSON schema: {error}"
    if spec.kind == "regex":
        return f"invalid regex: {error}"
    if spec.kind == "grammar":
        return f"grammar syntax error: {error}"
    if spec.kind == "choice":
        return f"invalid choice: {error}"
    return f"invalid structural tag: {error}"


def _parse_schema(text: str) -> dict[str, Any] | bool:
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON schema: the schema is not JSON ({exc}); send a JSON object") from None
    if not isinstance(schema, dict | bool):
        raise ValueError(
            f"invalid JSON schema: a schema is a JSON object or boolean, not {type(schema).__name__}"
        )
    return schema


def _json_grammar(schema: dict[str, Any] | bool, spec: StructuredOutputSpec) -> str:
    if spec.disable_additional_properties and isinstance(schema, dict):
        schema = close_objects(schema)
    # vLLM's guidance backend: free whitespace between JSON tokens unless disabled.
    # oneOf is read as anyOf (as xgrammar does): Pydantic writes unions as oneOf, and
    # their branches are nearly always disjoint.
    options: Any = {"whitespace_flexible": not spec.disable_any_whitespace, "coerce_one_of": True}
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=options)
    except ValueError as exc:
        raise ValueError(f"invalid JSON schema: {exc}") from None


def close_objects(schema: Any) -> Any:
    """`schema` with additionalProperties: false on every object schema that leaves it out
    (vLLM's disable_additional_properties): the model writes only the declared properties."""
    if isinstance(schema, list):
        return [close_objects(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: close_objects(value) for key, value in schema.items()}
    if (closed.get("type") == "object" or "properties" in closed) and "additionalProperties" not in closed:
        closed["additionalProperties"] = False
    return closed


def _choice_lark(text: str) -> str:
    try:
        choices = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid choice: not a JSON list ({exc}); send a list of strings") from None
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise ValueError("invalid choice: send a non-empty list of strings")
    # A JSON string literal is a valid Lark string literal, escapes included.
    return "start: " + " | ".join(json.dumps(c) for c in choices)


def _structural_tag_grammar(text: str) -> str:
    """vLLM's structural tag: free text in which each trigger opens one of the structures,
    whose body follows its JSON schema up to its end string."""
    try:
        tag = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid structural tag: not JSON ({exc})") from None
    structures = tag.get("structures") if isinstance(tag, dict) else None
    triggers = tag.get("triggers") if isinstance(tag, dict) else None
    if not isinstance(structures, list) or not structures or not isinstance(triggers, list) or not triggers:
        raise ValueError(
            'invalid structural tag: send {"structures": [{"begin": ..., "schema": {...}, "end": ...}], '
            '"triggers": [...]} with at least one of each'
        )
    tags = []
    for i, structure in enumerate(structures):
        if not isinstance(structure, dict) or not all(
            isinstance(structure.get(k), str) for k in ("begin", "end")
        ):
            raise ValueError(
                f"invalid structural tag: structures[{i}] needs string begin and end and a schema"
            )
        begin = structure["begin"]
        trigger = next((t for t in triggers if isinstance(t, str) and t and begin.startswith(t)), None)
        if trigger is None:
            raise ValueError(
                f"invalid structural tag: structures[{i}].begin {begin!r} starts with none of the triggers"
            )
        tags.append(
            llguidance.StructTag(
                trigger=trigger, begin=begin, grammar=structure.get("schema", {}), end=structure["end"]
            )
        )
    return llguidance.StructTag.to_grammar(tags)
