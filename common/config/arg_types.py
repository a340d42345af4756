"""Converters for command-line values: each turns one string into a checked value or
raises argparse.ArgumentTypeError with a message that says what is allowed.

argparse prefixes the message with the flag ("argument --block-size: ..."), so a bad
value always ends as one line naming the flag and the allowed values.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any, TypeVar

T = TypeVar("T")

# vLLM's rule: lower case suffixes are powers of 1000, upper case powers of 1024.
_DECIMAL_SUFFIXES = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BINARY_SUFFIXES = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)([kmgtKMGT])")
_SIZE_HELP = "an integer, optionally with a suffix k/m/g (x1000, x10^6, x10^9) or K/M/G (x1024, x2^20, x2^30), e.g. 4096, 32k, 1K, 25.6k"


def parse_human_int(text: str) -> int:
    """'1k' -> 1000, '1K' -> 1024, '25.6k' -> 25600, '4096' -> 4096.

    Decimals are allowed with the decimal suffixes only, and the result must be a whole
    number ('1.0005k' is refused rather than silently truncated).
    """
    s = text.strip()
    match = _SIZE_RE.fullmatch(s)
    if match is None:
        try:
            return int(s)
        except ValueError:
            raise ValueError(f"invalid value {text!r}: expected {_SIZE_HELP}") from None
    number, suffix = match.groups()
    if suffix in _BINARY_SUFFIXES:
        if "." in number:
            raise ValueError(
                f"invalid value {text!r}: decimals are not allowed with the binary suffix "
                f"{suffix}; did you mean {number}{suffix.lower()}?"
            )
        return int(number) * _BINARY_SUFFIXES[suffix]
    value = Decimal(number) * _DECIMAL_SUFFIXES[suffix]
    if value != value.to_integral_value():
        raise ValueError(f"invalid value {text!r}: {value.normalize():f} is not a whole number")
    return int(value)


def human_int(minimum: int | None = None) -> Callable[[str], int]:
    """A converter for sizes and token counts written as 1k, 1K, 25.6k or plain ints."""

    def convert(text: str) -> int:
        try:
            value = parse_human_int(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(
                f"invalid value {text!r}: must be at least {minimum} ({_SIZE_HELP})"
            )
        return value

    convert.__name__ = "human_int"
    return convert


def int_at_least(minimum: int) -> Callable[[str], int]:
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"invalid value {text!r}: expected an integer >= {minimum}"
            ) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: must be an integer >= {minimum}")
        return value

    convert.__name__ = "int"
    return convert


def any_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected an integer") from None


def fraction(text: str) -> float:
    """A float in (0, 1], like --gpu-memory-utilization."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid value {text!r}: expected a number greater than 0 and at most 1, e.g. 0.9"
        ) from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(
            f"invalid value {text!r}: must be greater than 0 and at most 1, e.g. 0.9"
        )
    return value


def number_above(
    minimum: float = 0.0, *, inclusive: bool = False, unit: str = "", subject: str = ""
) -> Callable[[str], float]:
    """A converter for a number more than `minimum` (at least it, if `inclusive`), refusing nan;
    `unit` names what it counts ("second"), `subject` the value in the message ("the TTL")."""
    units = f" {unit}{'' if minimum == 1 else 's'}" if unit else ""
    bound = f"{'at least' if inclusive else 'more than'} {minimum:g}{units}"
    prefix = f"{subject} " if subject else ""
    expected = f"a number of {unit}s" if unit else "a number"

    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected {expected}") from None
        if not (value >= minimum if inclusive else value > minimum):  # refuses nan too
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: {prefix}must be {bound}")
        return value

    convert.__name__ = f"{unit}s" if unit else "float"
    return convert


def seconds(minimum: float = 0.0, *, inclusive: bool = False, subject: str = "") -> Callable[[str], float]:
    """A converter for a duration in seconds ("the TTL must be at least 1 second")."""
    return number_above(minimum, inclusive=inclusive, unit="second", subject=subject)


def registry_url(text: str) -> str:
    """A Redis worker-registry URL, redis://HOST:PORT/DB (common/registry.py checks it)."""
    from common.registry import check_registry_url  # only for this flag: it pulls in msgpack

    try:
        return check_registry_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def choice(choices: Sequence[T], convert: Callable[[str], T] | None = None) -> Callable[[str], T]:
    """A converter that accepts only `choices` (after `convert`), naming them all when it refuses."""
    allowed = ", ".join(str(c) for c in choices)

    def check(text: str) -> T:
        try:
            value = convert(text) if convert is not None else text
        except ValueError:
            value = None
        if value not in choices:
            raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {allowed})")
        return value  # type: ignore[return-value]

    check.__name__ = "choice"
    return check


def json_object(option: str) -> Callable[[str], dict[str, Any]]:
    """A converter for a JSON object given whole to `option` on the command line."""

    def convert(text: str) -> dict[str, Any]:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(
                f"invalid JSON {text!r} ({e.msg} at column {e.colno}); pass an object like "
                f'\'{{"key": "value"}}\' or set keys one at a time with {option}.key value'
            ) from None
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError(
                f'expected a JSON object like \'{{"key": "value"}}\', got {type(value).__name__} {text!r}'
            )
        return value

    convert.__name__ = "json_object"
    return convert
