"""What a request's `tool_choice` asks for, checked against its `tools`, and the output
constraint it sets, as vLLM reads them.

- absent: "auto" when tools are given, "none" otherwise;
- "none": tools may be rendered into the prompt, but no call is read from the output;
- "auto": the model decides; the --tool-call-parser reads calls from its text;
- "required": the output is constrained to a JSON array of at least one call,
  [{"name": <one of the tools>, "parameters": <that tool's parameters>}, ...], at most
  one when parallel_tool_calls is false (vLLM constrains only the minimum and drops the
  extra calls afterwards);
- {"type": "function", "function": {"name": ...}}: the output is constrained to that
  function's parameters schema, and the whole output is the call's arguments.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from common.openai_api.tool_calls.tools import find_tool, tool_names
from common.structured_output.spec import StructuredOutputSpec

ToolChoiceMode = Literal["none", "auto", "required", "function"]
_EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}
_USAGE = (
    '"none", "auto", "required" or {"type": "function", "function": {"name": ...}} naming one of the tools'
)


@dataclass(frozen=True)
class ToolChoice:
    mode: ToolChoiceMode
    function: str | None = None  # the function a named choice forces

    @property
    def constrained(self) -> bool:
        """Whether the output is constrained (and its calls read by forced_calls, not a parser)."""
        return self.mode in ("required", "function")


def parse_tool_choice(tool_choice: Any, tools: Sequence[Mapping[str, Any]] | None) -> ToolChoice:
    """The request's choice; ValueError saying what is wrong. `tools` are already validated."""
    if tool_choice is None:
        return ToolChoice("auto" if tools else "none")
    if tool_choice == "none":
        return ToolChoice("none")
    if isinstance(tool_choice, str):
        if tool_choice not in ("auto", "required"):
            raise ValueError(f"tool_choice {tool_choice!r} is not supported; use {_USAGE}")
        if not tools:
            raise ValueError(f'tool_choice "{tool_choice}" needs tools; send tools or drop tool_choice')
        return ToolChoice(tool_choice)  # type: ignore[arg-type]
    if not isinstance(tool_choice, Mapping):
        raise ValueError(f"tool_choice must be {_USAGE}, got {type(tool_choice).__name__}")
    if tool_choice.get("type", "function") != "function":
        raise ValueError(f"tool_choice has type {tool_choice.get('type')!r}; use {_USAGE}")
    function = tool_choice.get("function")
    name = function.get("name") if isinstance(function, Mapping) else None
    if not isinstance(name, str) or not name:
        raise ValueError(f"tool_choice names no function; use {_USAGE}")
    if not tools:
        raise ValueError(f"tool_choice names the function {name!r} but no tools were sent; send it in tools")
    if find_tool(tools, name) is None:
        raise ValueError(
            f"tool_choice names the function {name!r}, which is not among the tools "
            f"({', '.join(tool_names(tools))}); name one of them"
        )
    return ToolChoice("function", name)


def tool_choice_spec(
    choice: ToolChoice, tools: Sequence[Mapping[str, Any]], parallel_tool_calls: bool = True
) -> StructuredOutputSpec | None:
    """The output constraint of a "required" or named choice; None for "none" and "auto"."""
    if choice.mode == "function":
        function = find_tool(tools, choice.function or "")
        if function is None:
            raise ValueError(
                f"tool_choice names the function {choice.function!r}, which is not among the tools"
            )
        return StructuredOutputSpec.from_params(json=dict(function.get("parameters") or _EMPTY_PARAMETERS))
    if choice.mode == "required":
        return StructuredOutputSpec.from_params(json=required_schema(tools, parallel_tool_calls))
    return None


def required_schema(tools: Sequence[Mapping[str, Any]], parallel_tool_calls: bool = True) -> dict[str, Any]:
    """vLLM's schema for tool_choice "required": an array of {"name", "parameters"} objects,
    one branch per tool, with the tools' "$defs" gathered at the top so references resolve."""
    branches = []
    definitions: dict[str, Any] = {}
    for tool in tools:
        function = tool["function"]
        parameters = copy.deepcopy(dict(function.get("parameters") or _EMPTY_PARAMETERS))
        for name, schema in parameters.pop("$defs", {}).items():
            if name in definitions and definitions[name] != schema:
                raise ValueError(
                    f"tools define '$defs/{name}' differently ({function['name']} and another tool); "
                    'tool_choice "required" puts every tool\'s definitions in one schema, so rename one'
                )
            definitions[name] = schema
        branches.append(
            {
                "properties": {
                    "name": {"type": "string", "enum": [function["name"]]},
                    "parameters": parameters,
                },
                "required": ["name", "parameters"],
            }
        )
    schema: dict[str, Any] = {"type": "array", "minItems": 1}
    if not parallel_tool_calls:
        schema["maxItems"] = 1
    schema["items"] = {"type": "object", "anyOf": branches}
    if definitions:
        schema["$defs"] = definitions
    return schema
