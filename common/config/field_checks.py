"""Checks shared by the JSON config objects (--kv-transfer-config, --kv-events-config):
their errors are ValueErrors whose text the parser prints after the option's name."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def check_known_fields(data: Mapping[str, Any], known: Iterable[str]) -> None:
    known = list(known)
    unknown = [key for key in data if key not in known]
    if unknown:
        raise ValueError(
            f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"known fields: {', '.join(known)}"
        )


def check_str(name: str, value: Any, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {value!r}")


def check_int(
    name: str, value: Any, minimum: int, maximum: int | None = None, *, optional: bool = False
) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise ValueError(f"{name} must be {bounds}, got {value}")


def check_choice(name: str, value: Any, choices: Iterable[str], *, optional: bool = False) -> None:
    if value is None and optional:
        return
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"Unsupported {name} {value!r}; choose from {', '.join(choices)}")
