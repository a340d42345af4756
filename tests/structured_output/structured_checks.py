"""Checks of constrained output: jsonschema validation with the formats it leaves out."""

from __future__ import annotations

import json
import re
from datetime import datetime


def format_checker():
    """jsonschema's format checks, plus date-time (RFC 3339), which it checks only with an
    optional package installed."""
    import jsonschema

    checker = jsonschema.FormatChecker()

    @checker.checks("date-time", raises=ValueError)
    def _date_time(value: object) -> bool:
        if not isinstance(value, str):
            return True
        if not re.fullmatch(r"\d{4}-\d\d-\d\d[Tt]\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)", value):
            raise ValueError(f"not an RFC 3339 date-time: {value!r}")
        # A leap second (:60) is valid RFC 3339 that datetime cannot hold.
        datetime.fromisoformat(re.sub(r":60(?=[.Zz+-])", ":59", value.upper().replace("Z", "+00:00")))
        return True

    return checker


def assert_valid_json(text: str, schema: dict) -> None:
    import jsonschema

    jsonschema.validate(json.loads(text), schema, format_checker=format_checker())
