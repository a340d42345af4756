"""A qwen3_coder parameter's text as the JSON value its type in the tool's schema says, as
vLLM converts it: integers, numbers (whole ones as integers), booleans, objects and arrays
(JSON, or a Python literal), "null"/"None" as null where the type is not a string or the
schema allows null; strings, parameters the schema does not name, and text that does not
fit its type stay text.
"""

from __future__ import annotations

import ast
import json
import math
from collections.abc import Mapping
from typing import Any

from common.openai_api.tool_calls import json_text

_STRING_TYPES = ("string", "str", "text", "varchar", "char", "enum")
_INTEGER_PREFIXES = ("int", "uint", "long", "short", "unsigned")
_CONTAINER_TYPES = ("object", "array", "arr")


def convert_parameter(value: str, schema: Any) -> Any:
    """A parameter's text as the JSON value its schema's type says, as vLLM converts it;
    the text itself when the parameter is not in the schema or the text does not fit."""
    if not isinstance(schema, Mapping):
        return value
    kind, nullable = _schema_type(schema)
    if nullable and value.lower() in ("null", "none"):
        return None
    if kind in _STRING_TYPES:
        return value
    if value.lower() in ("null", "none"):
        return None
    if kind.startswith(_INTEGER_PREFIXES):
        try:
            return int(value)
        except ValueError:
            return value
    if kind.startswith(("num", "float")):
        try:
            number = float(value)
        except ValueError:
            return value
        if not math.isfinite(number):
            return value
        return int(number) if number.is_integer() else number
    if kind in ("boolean", "bool", "binary"):
        return value.lower() == "true"
    container = kind in _CONTAINER_TYPES or kind.startswith(("dict", "list"))
    if container:
        try:
            parsed = json_text.loads(value)
        except ValueError:
            pass
        else:
            return _literal(parsed) if isinstance(parsed, str) else parsed
    parsed = _literal(value)
    if container and isinstance(parsed, str):
        parsed = _literal(parsed)
    return parsed


def _schema_type(schema: Mapping[str, Any]) -> tuple[str, bool]:
    """(the type to convert to, whether null is allowed): "type", or the first non-null
    type of "anyOf"; "string" when neither says."""
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        names = [str(t).strip().lower() for t in types]
        others = [name for name in names if name != "null"]
        return (others[0] if others else "null"), "null" in names
    if isinstance(schema.get("anyOf"), list):
        names = [
            str(option["type"]).strip().lower()
            for option in schema["anyOf"]
            if isinstance(option, Mapping) and "type" in option
        ]
        others = [name for name in names if name != "null"]
        return (others[0] if others else "string"), "null" in names
    return "string", False


def _literal(value: Any) -> Any:
    """A Python literal's value (dicts, lists, quoted strings), or `value` when it is none;
    kept only when it is also JSON."""
    if not isinstance(value, str):
        return value
    try:
        parsed = ast.literal_eval(value)
        json.dumps(parsed, allow_nan=False)
    except Exception:  # not a literal, or not JSON (sets, bytes, inf), or too deep
        return value
    return parsed
