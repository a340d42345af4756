"""The request fields that constrain a completion's output, and the one spec they make.

vLLM's fields, on /v1/completions and /v1/chat/completions alike:
- `response_format` (OpenAI's): {"type": "text"} (free text), {"type": "json_object"},
  {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}, and vLLM's
  {"type": "structural_tag", "structures": [{"begin", "schema", "end"}], "triggers"};
- `structured_outputs` (vLLM's): one of json, regex, choice, grammar, json_object,
  structural_tag, with the switches disable_any_whitespace, disable_additional_properties,
  disable_fallback, whitespace_pattern and backend;
- vLLM's older guided_json, guided_regex, guided_choice, guided_grammar,
  guided_decoding_backend and guided_whitespace_pattern.

A request sets at most one constraint across all of them, and the switches of
structured_outputs apply to it whichever field carries it; a switch the request leaves
out takes its --structured-outputs-config default. The grammar engine checks every spec
(through the validation cache) before any worker sees the request: each refusal is a 400
naming the field that carried the constraint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from common.config.structured_outputs_config import StructuredOutputsConfig
from common.openai_api.errors import bad_request
from common.structured_output.grammar_cache import resolve_backend
from common.structured_output.spec import KINDS, StructuredOutputSpec
from common.structured_output.validation_cache import check_spec

# As the request bodies' own (requests.py): a field takes its JSON type only, extra keys
# are kept and ignored.
_FIELDS_CONFIG = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)
_GUIDED = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}
_NON_EMPTY = {"minItems": 1}


def _deprecated(instead: str) -> Any:
    # documented as deprecated, as vLLM does; pydantic's own flag would warn on every read
    return Field(None, json_schema_extra={"deprecated": True, "description": f"Deprecated: {instead}."})


class TextResponseFormat(BaseModel):
    model_config = _FIELDS_CONFIG
    type: Literal["text"]


class JsonObjectResponseFormat(BaseModel):
    model_config = _FIELDS_CONFIG
    type: Literal["json_object"]


class JsonSchema(BaseModel):
    """response_format.json_schema: a named JSON schema (OpenAI's)."""

    model_config = _FIELDS_CONFIG
    name: str
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None  # the output always follows the schema, strict or not


class JsonSchemaResponseFormat(BaseModel):
    model_config = _FIELDS_CONFIG
    type: Literal["json_schema"]
    json_schema: JsonSchema


class StructuralTag(BaseModel):
    """Text from `begin` to `end` whose body follows `schema` (vLLM's)."""

    model_config = _FIELDS_CONFIG
    begin: str
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    end: str


class StructuralTagResponseFormat(BaseModel):
    """Free text in which each trigger opens one of the structures (vLLM's)."""

    model_config = _FIELDS_CONFIG
    type: Literal["structural_tag"]
    structures: list[StructuralTag] = Field(min_length=1)
    triggers: list[str] = Field(min_length=1)


ResponseFormat = Annotated[
    TextResponseFormat | JsonObjectResponseFormat | JsonSchemaResponseFormat | StructuralTagResponseFormat,
    Field(discriminator="type"),
]
_FORMATS: dict[str, type[BaseModel]] = {
    "text": TextResponseFormat,
    "json_object": JsonObjectResponseFormat,
    "json_schema": JsonSchemaResponseFormat,
    "structural_tag": StructuralTagResponseFormat,
}


class StructuredOutputsParams(BaseModel):
    """vLLM's `structured_outputs`: one constraint and its switches."""

    model_config = _FIELDS_CONFIG
    json_: str | dict[str, Any] | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, json_schema_extra=_NON_EMPTY)
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | dict[str, Any] | None = None
    # None: the --structured-outputs-config default
    disable_any_whitespace: bool | None = None
    disable_additional_properties: bool | None = None
    disable_fallback: bool | None = None  # one backend: nothing to fall back to
    whitespace_pattern: str | None = None  # refused: the grammar engine keeps its own
    backend: str | None = None  # refused unless it selects the server's own backend

    def constraints(self) -> list[tuple[str, Any]]:
        """(kind, value) of each constraint set; json_object false is none."""
        values = {kind: getattr(self, "json_" if kind == "json" else kind) for kind in KINDS}
        return [(kind, value) for kind, value in values.items() if value is not None and value is not False]


@dataclass(frozen=True)
class _Constraint:
    param: str  # the request field that carries it, as errors name it
    kind: str
    value: Any


class StructuredOutputFields(BaseModel):
    """The fields of a generation request that constrain its output (both endpoints)."""

    model_config = _FIELDS_CONFIG

    response_format: ResponseFormat | None = Field(
        None,
        description="The output's format: text (free), json_object (any JSON object), json_schema (JSON "
        "that follows json_schema.schema) or vLLM's structural_tag. One constraint per request.",
    )
    structured_outputs: StructuredOutputsParams | None = Field(
        None,
        description="vLLM's structured outputs: one of json (a JSON schema), regex, choice, grammar (Lark "
        "or GBNF), json_object, structural_tag; its switches apply to response_format's constraint too.",
    )
    guided_json: str | dict[str, Any] | None = _deprecated("use structured_outputs.json")
    guided_regex: str | None = _deprecated("use structured_outputs.regex")
    guided_choice: list[str] | None = Field(
        None,
        json_schema_extra={
            **_NON_EMPTY,
            "deprecated": True,
            "description": "Deprecated: use structured_outputs.choice.",
        },
    )
    guided_grammar: str | None = _deprecated("use structured_outputs.grammar")
    guided_decoding_backend: str | None = _deprecated(
        "the server's --structured-outputs-config backend is used"
    )
    guided_whitespace_pattern: str | None = _deprecated(
        "not supported; use structured_outputs.disable_any_whitespace"
    )

    @field_validator("response_format", mode="before")
    @classmethod
    def _response_format_of_its_type(cls, value: Any) -> Any:
        """Validate by the type it names, so that errors name its fields as the client wrote
        them ("response_format: json_schema.name: Field required"), not the union's branch."""
        if not isinstance(value, dict):
            return value  # None, or the union's own "not an object" error
        kind = value.get("type")
        model = _FORMATS.get(kind) if isinstance(kind, str) else None
        if model is None:
            raise ValueError(f"type must be one of {', '.join(map(repr, _FORMATS))}, got {kind!r}")
        try:
            return model.model_validate(value)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise ValueError(f"{where}: {first['msg']}" if where else first["msg"]) from None

    def structured_output_spec(self, config: StructuredOutputsConfig) -> StructuredOutputSpec | None:
        """The request's one constraint, checked by the grammar engine; None for free text.

        An OpenAIError 400 names the field at fault: two constraints at once, a switch
        this server cannot honour, or a constraint the grammar engine refuses.
        """
        self._refuse_whitespace_patterns()
        constraints = self._constraints()
        if len(constraints) > 1:
            names = [c.param for c in constraints]
            raise bad_request(
                f"{_listed(names)} {'both' if len(names) == 2 else 'each'} constrain the output, and a request "
                "takes one constraint (response_format, structured_outputs or a guided_* field); keep one of them",
                names[0],
            )
        if not constraints:
            if self.structured_outputs is not None:
                raise bad_request(
                    "structured_outputs sets no constraint; set one of json, regex, choice, grammar, "
                    "json_object or structural_tag, or drop structured_outputs",
                    "structured_outputs",
                )
            return None
        self._check_backend(config)
        (constraint,) = constraints
        spec = _spec(constraint, self._switches(config))
        try:
            check_spec(spec)
        except ValueError as exc:
            raise bad_request(str(exc), constraint.param) from None
        return spec

    def _constraints(self) -> list[_Constraint]:
        found = []
        if self.response_format is not None and self.response_format.type != "text":
            found.append(_Constraint("response_format", self.response_format.type, self.response_format))
        if self.structured_outputs is not None:
            found += [
                _Constraint(f"structured_outputs.{kind}", kind, value)
                for kind, value in self.structured_outputs.constraints()
            ]
        found += [
            _Constraint(name, kind, getattr(self, name))
            for name, kind in _GUIDED.items()
            if getattr(self, name) is not None
        ]
        return found

    def _refuse_whitespace_patterns(self) -> None:
        given = {
            "structured_outputs.whitespace_pattern": self._given("whitespace_pattern"),
            "guided_whitespace_pattern": self.guided_whitespace_pattern,
        }
        for param, pattern in given.items():
            if pattern is not None:
                raise bad_request(
                    f"{param} is not supported: the grammar engine (llguidance) places JSON whitespace "
                    "itself; drop it, or set structured_outputs.disable_any_whitespace to true for JSON "
                    "without whitespace between its tokens",
                    param,
                )

    def _check_backend(self, config: StructuredOutputsConfig) -> None:
        """vLLM refuses a request-level backend other than the server's own."""
        given = {
            "structured_outputs.backend": self._given("backend"),
            "guided_decoding_backend": self.guided_decoding_backend,
        }
        for param, backend in given.items():
            if backend is None:
                continue
            try:
                same = resolve_backend(backend) == config.engine
            except ValueError:
                same = False
            if not same:
                raise bad_request(
                    f"{param} {backend!r}: request-level structured output backend selection is not "
                    f"supported; this server uses {config.backend!r} ({config.engine}), chosen by "
                    f"--structured-outputs-config; drop {param} from the request",
                    param,
                )

    def _switches(self, config: StructuredOutputsConfig) -> dict[str, bool]:
        switches = {}
        for name in ("disable_any_whitespace", "disable_additional_properties"):
            value = self._given(name)
            switches[name] = getattr(config, name) if value is None else value
        return switches

    def _given(self, name: str) -> Any:
        """structured_outputs.<name>; None when the request has no structured_outputs."""
        return getattr(self.structured_outputs, name) if self.structured_outputs is not None else None


def _spec(constraint: _Constraint, switches: dict[str, bool]) -> StructuredOutputSpec:
    value = constraint.value
    if constraint.param == "response_format":
        if constraint.kind == "json_object":
            return StructuredOutputSpec("json_object", **switches)
        if constraint.kind == "json_schema":
            value = value.json_schema.schema_
            return _from_params(constraint.param, "json", value, switches)
        value = {
            "structures": [
                {"begin": s.begin, **({"schema": s.schema_} if s.schema_ is not None else {}), "end": s.end}
                for s in value.structures
            ],
            "triggers": value.triggers,
        }
        return _from_params(constraint.param, "structural_tag", value, switches)
    if constraint.kind == "choice" and not value:
        raise bad_request(
            f"{constraint.param} is an empty list; give at least one string the output may be",
            constraint.param,
        )
    return _from_params(constraint.param, constraint.kind, value, switches)


def _from_params(param: str, kind: str, value: Any, switches: dict[str, bool]) -> StructuredOutputSpec:
    try:
        spec = StructuredOutputSpec.from_params(**{kind: value}, **switches)
    except ValueError as exc:
        raise bad_request(str(exc), param) from None
    assert spec is not None
    return spec


def _listed(names: list[str]) -> str:
    return " and ".join(names) if len(names) <= 2 else f"{', '.join(names[:-1])} and {names[-1]}"
