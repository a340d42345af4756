"""Reading the JSON a model writes: where an object or array that is still being written
ends, and parsing it strictly.

The end is found by counting brackets outside strings, looking at each character once
however many times the text grows (text already looked at may be dropped); whether the
text between is JSON is left to the parser.
"""

from __future__ import annotations

import json
import re
from typing import Any

_OUTSIDE_STRING = re.compile(r'["{}\[\]]')
_INSIDE_STRING = re.compile(r'["\\]')


def loads(text: str) -> Any:
    """json.loads without NaN and Infinity, which are not JSON; ValueError when not JSON."""
    return json.loads(text, parse_constant=_not_json)


def dumps(value: Any) -> str:
    """Arguments as vLLM writes them: default separators, non-ASCII text kept."""
    return json.dumps(value, ensure_ascii=False)


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


class BracketEnd:
    """Finds where the object or array opening at `start` closes, as its text arrives."""

    def __init__(self, start: int) -> None:
        self.start = start
        self._at = start  # the next character to look at
        self._depth = 0
        self._in_string = False
        self._escaped = False  # a backslash ended the text seen, inside a string

    def shift(self, consumed: int) -> None:
        self.start -= consumed
        self._at -= consumed

    def end(self, text: str, limit: int | None = None) -> int | None:
        """The index just past the closing bracket, once text[:limit] holds it; else None."""
        stop = len(text) if limit is None else limit
        at = self._at
        if self._escaped and at < stop:
            self._escaped, at = False, at + 1
        while at < stop:
            if self._in_string:
                found = _INSIDE_STRING.search(text, at, stop)
                if found is None:
                    at = stop
                    break
                at = found.start()
                if text[at] == "\\":
                    if at + 1 >= stop:  # the escaped character has not arrived yet
                        self._escaped, at = True, stop
                        break
                    at += 2
                    continue
                self._in_string = False
                at += 1
                continue
            found = _OUTSIDE_STRING.search(text, at, stop)
            if found is None:
                at = stop
                break
            at = found.start()
            char = text[at]
            at += 1
            if char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            else:
                self._depth -= 1
                if self._depth <= 0:
                    self._at = at
                    return at
        self._at = at
        return None
