"""A request body as JSON, or the 400 that says where it is broken.

Standard JSON only: NaN and Infinity are not JSON, a number too large for a float is
refused rather than read as infinity, and a string holding a lone UTF-16 surrogate
(`"\\ud800"`, valid JSON escape but no Unicode character) is refused, since nothing
downstream (tokenizer, chat template, response encoding) can handle one. Nesting
deeper than the interpreter can parse is a 400, never a crash. Torch-free.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from common.openai_api.errors import bad_request

# a \u escape of a surrogate: only bodies containing one need the full string walk
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class _NotJson(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise _NotJson(f"{name} is not a JSON value; send numbers as finite decimals")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotJson(f"the number {text[:40]} is too large for a 64-bit float")
    return value


def parse_json_body(raw: bytes) -> Any:
    """`raw` decoded as standard JSON; OpenAIError 400 naming what is wrong."""
    if not raw:
        raise bad_request("the request body is empty; send a JSON object")
    try:
        body = json.loads(raw, parse_constant=_reject_constant, parse_float=_finite_float)
    except UnicodeDecodeError:
        raise bad_request("the request body is not UTF-8 text; send a JSON object") from None
    except json.JSONDecodeError as exc:
        raise bad_request(
            f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except _NotJson as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise bad_request("the request body nests arrays or objects too deeply; flatten it") from None
    except ValueError:  # an integer literal of more digits than Python converts
        raise bad_request(
            "the request body holds a number of thousands of digits; integers must fit in 64 bits"
        ) from None
    if _SURROGATE_ESCAPE.search(raw):
        _check_strings(body)
    return body


def _check_strings(body: Any) -> None:
    """Every string (keys too) must be encodable Unicode; iterative, as the body may nest deeply."""
    stack = [body]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            _check_text(item)
        elif isinstance(item, dict):
            for key, value in item.items():
                _check_text(key)
                stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        raise bad_request(
            f"the request body holds a lone UTF-16 surrogate (\\u{ord(bad):04x}) in a string; "
            "it is not a Unicode character: send valid text (pairs of surrogates are fine)",
        ) from None


def json_type_name(value: Any) -> str:
    """What a decoded JSON value is called in JSON's own words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object" if isinstance(value, dict) else type(value).__name__
