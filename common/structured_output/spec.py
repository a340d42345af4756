"""What one request constrains its output to: a kind and its text, as data.

The kinds and field names are vLLM's `StructuredOutputsParams` (request field
`structured_outputs`): `json` (a JSON schema), `json_object` (any JSON object), `regex`,
`choice` (a list of strings), `grammar` (EBNF: Lark or GBNF), `structural_tag`. The older
`guided_json` / `guided_regex` / `guided_choice` / `guided_grammar` fields and the OpenAI
`response_format` map onto the same kinds. The text is canonical (a schema or choice list
given as Python data is serialized once, keeping key order, which decides the order the
model writes properties in), so two equal requests share one compiled grammar.

Torch-free: the router builds and validates specs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

StructuredOutputKind = Literal["json", "json_object", "regex", "choice", "grammar", "structural_tag"]
KINDS: tuple[str, ...] = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")


@dataclass(frozen=True)
class StructuredOutputSpec:
    """One request's constraint.

    text by kind: json, the schema as JSON text; json_object, empty; regex, the pattern;
    choice, a JSON list of strings; grammar, the Lark or GBNF source; structural_tag,
    vLLM's JSON object {"structures": [{"begin", "schema", "end"}], "triggers": [...]}.
    disable_any_whitespace / disable_additional_properties are the fields of the same
    names in `structured_outputs` and in --structured-outputs-config: JSON without
    free whitespace between tokens, and objects closed unless the schema opens them.
    """

    kind: StructuredOutputKind
    text: str = ""
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown structured output kind {self.kind!r}; use one of {', '.join(KINDS)}")
        if not isinstance(self.text, str):
            raise ValueError(
                f"structured output {self.kind}: text must be a string, got {type(self.text).__name__}"
            )

    @property
    def cache_key(self) -> tuple[str, str, bool, bool]:
        """Everything that changes the compiled grammar, tokenizer aside."""
        return (self.kind, self.text, self.disable_any_whitespace, self.disable_additional_properties)

    @classmethod
    def from_params(
        cls,
        *,
        json: str | dict[str, Any] | bool | None = None,
        regex: str | None = None,
        choice: list[str] | None = None,
        grammar: str | None = None,
        json_object: bool | None = None,
        structural_tag: str | dict[str, Any] | None = None,
        disable_any_whitespace: bool = False,
        disable_additional_properties: bool = False,
    ) -> StructuredOutputSpec | None:
        """The spec of vLLM's `structured_outputs` fields; None when none is set.

        Exactly one constraint may be set, as vLLM requires.
        """
        given = {
            name: value
            for name, value in (
                ("json", json),
                ("regex", regex),
                ("choice", choice),
                ("grammar", grammar),
                ("json_object", json_object or None),
                ("structural_tag", structural_tag),
            )
            if value is not None
        }
        if not given:
            return None
        if len(given) > 1:
            raise ValueError(
                f"structured_outputs sets {', '.join(sorted(given))}; set exactly one of "
                "json, regex, choice, grammar, json_object, structural_tag"
            )
        ((kind, value),) = given.items()
        options = {
            "disable_any_whitespace": disable_any_whitespace,
            "disable_additional_properties": disable_additional_properties,
        }
        if kind == "json_object":
            return cls("json_object", "", **options)
        if kind == "choice":
            if not isinstance(value, list | tuple) or not value or not all(isinstance(c, str) for c in value):
                raise ValueError("structured_outputs.choice must be a non-empty list of strings")
            return cls("choice", _dumps(list(value)), **options)
        if kind in ("json", "structural_tag") and not isinstance(value, str):
            return cls(kind, _dumps(value), **options)
        if not isinstance(value, str):
            raise ValueError(f"structured_outputs.{kind} must be a string, got {type(value).__name__}")
        return cls(kind, value, **options)  # type: ignore[arg-type]

    @classmethod
    def from_response_format(cls, response_format: dict[str, Any]) -> StructuredOutputSpec | None:
        """The spec of an OpenAI `response_format`; None for {"type": "text"}."""
        kind = response_format.get("type")
        if kind in (None, "text"):
            return None
        if kind == "json_object":
            return cls("json_object")
        if kind == "json_schema":
            body = response_format.get("json_schema")
            if not isinstance(body, dict) or "schema" not in body:
                raise ValueError(
                    'response_format of type "json_schema" needs json_schema: {"name": ..., "schema": {...}}'
                )
            return cls("json", _dumps(body["schema"]))
        if kind == "structural_tag":
            return cls("structural_tag", _dumps({k: v for k, v in response_format.items() if k != "type"}))
        raise ValueError(
            f"response_format type {kind!r} is not supported; use text, json_object, json_schema or structural_tag"
        )


def _dumps(value: Any) -> str:
    # Compact and in the caller's key order: property order is part of the constraint.
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
