"""A request's `tools`: checking the definitions before anything is rendered or generated,
and looking one up by name.

Each tool is {"type": "function", "function": {"name", "description"?, "parameters"?}},
"parameters" a JSON schema the grammar engine must be able to compile (tool_choice
"required" and named functions constrain the output with it).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from common.structured_output.spec import StructuredOutputSpec
from common.structured_output.validate import validate_spec

_SHAPE = '{"type": "function", "function": {"name": ..., "description": ..., "parameters": {...}}}'


def validate_tools(tools: Any) -> list[dict[str, Any]]:
    """`tools` when every definition is well formed; ValueError naming the first that is not."""
    if not isinstance(tools, list):
        raise ValueError(f"tools must be a list of tool definitions like {_SHAPE}")
    if not tools:
        raise ValueError("tools is an empty list; send at least one tool or leave tools out")
    for index, tool in enumerate(tools):
        _validate_tool(tool, index)
    return tools


def _validate_tool(tool: Any, index: int) -> None:
    where = f"tools[{index}]"
    if not isinstance(tool, Mapping):
        raise ValueError(f"{where} must be an object like {_SHAPE}")
    if tool.get("type", "function") != "function":
        raise ValueError(f'{where} has type {tool.get("type")!r}; only "function" tools are supported')
    function = tool.get("function")
    if not isinstance(function, Mapping):
        raise ValueError(f'{where} has no "function" object; send {_SHAPE}')
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f'{where}.function needs a non-empty string "name"')
    where = f"{where} ({name})"
    description = function.get("description")
    if description is not None and not isinstance(description, str):
        raise ValueError(f"{where}: description must be a string, got {type(description).__name__}")
    parameters = function.get("parameters")
    if parameters is None:
        return
    if not isinstance(parameters, Mapping):
        raise ValueError(f"{where}: parameters must be a JSON schema object, got {type(parameters).__name__}")
    try:
        text = json.dumps(parameters, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: parameters is not JSON ({exc})") from None
    try:
        validate_spec(StructuredOutputSpec("json", text))
    except ValueError as exc:
        raise ValueError(f"{where}: parameters: {exc}") from None


def find_tool(tools: Sequence[Mapping[str, Any]], name: str) -> Mapping[str, Any] | None:
    """The function definition named `name` (the inner "function" object), or None."""
    for tool in tools:
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if isinstance(function, Mapping) and function.get("name") == name:
            return function
    return None


def tool_names(tools: Sequence[Mapping[str, Any]]) -> list[str]:
    return [
        function["name"]
        for tool in tools
        if isinstance(tool, Mapping)
        and isinstance(function := tool.get("function"), Mapping)
        and isinstance(function.get("name"), str)
    ]


def parameter_properties(tools: Sequence[Mapping[str, Any]], name: str) -> dict[str, Any]:
    """The "properties" of the named function's parameters schema; {} when it has none."""
    function = find_tool(tools, name)
    parameters = function.get("parameters") if function is not None else None
    properties = parameters.get("properties") if isinstance(parameters, Mapping) else None
    return dict(properties) if isinstance(properties, Mapping) else {}
