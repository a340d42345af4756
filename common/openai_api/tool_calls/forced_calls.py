"""Reading the calls out of an output constrained by tool_choice "required" or a named
function, as a whole and as a stream, like the format parsers.

- named function: the whole output is the arguments of one call to it (vLLM passes it on
  as written); they stream as they are generated.
- "required": the output is [{"name": ..., "parameters": {...}}, ...], the name first, as
  the grammar writes it. Each item becomes a call once its name has closed, and the
  parameters' text, from its "{" to the "}" that closes it, streams as it is generated:
  the arguments are the parameters as written (vLLM re-serializes them; the grammar makes
  them well-formed JSON all the same). Since a call once begun cannot be taken back, an
  output cut short by max_tokens keeps the calls that closed and the one it cut, if that
  one's name had closed, with the arguments written so far; an item cut before its name
  closed, like anything not in the grammar's layout, is content from there on. Streamed
  and whole, the output reads the same.
"""

from __future__ import annotations

import re

from common.openai_api.tool_calls import json_text
from common.openai_api.tool_calls.json_text import BracketEnd
from common.openai_api.tool_calls.parser import ToolCallStream, ToolParser
from common.openai_api.tool_calls.tool_choice import ToolChoice

_WHITESPACE = " \t\r\n"


class NamedFunctionParser(ToolParser):
    name = "named function"

    def __init__(self, function: str) -> None:
        super().__init__()
        self.function = function

    def stream(self) -> ToolCallStream:
        return _NamedFunctionStream(self.function)


class RequiredToolCallsParser(ToolParser):
    name = "required"

    def stream(self) -> ToolCallStream:
        return _RequiredStream()


def forced_calls_parser(choice: ToolChoice) -> ToolParser | None:
    """The reader of a constrained choice's output; None when the output is not constrained."""
    if choice.mode == "function":
        return NamedFunctionParser(choice.function or "")
    if choice.mode == "required":
        return RequiredToolCallsParser()
    return None


class _NamedFunctionStream(ToolCallStream):
    def __init__(self, function: str) -> None:
        super().__init__()
        self._function = function

    def _step(self, final: bool) -> bool:
        if not self.tools_called and (final or self._pos < len(self._text)):
            self._begin_call(self._function)
        if self._pos == len(self._text):
            return False
        self._arguments(self._text[self._pos :])
        self._skip(len(self._text))
        return False


class _RequiredStream(ToolCallStream):
    def __init__(self) -> None:
        super().__init__()
        self._cursor = 0
        # what the text at the cursor holds: "open" the "["; "item" an item up to its name;
        # "parameters" the text up to the parameters' "{"; "arguments" the parameters;
        # "close" the item's "}"; "separator" "," or "]"; "after": past "]", left out;
        # "rest": what could not be read, content
        self._state = "open"
        self._parameters: BracketEnd | None = None

    def _shift(self, consumed: int) -> None:
        self._cursor -= consumed
        if self._parameters is not None:
            self._parameters.shift(consumed)

    def _step(self, final: bool) -> bool:
        if self._state == "rest":
            self._content(len(self._text))
            return False
        if self._state == "after":
            self._skip(len(self._text))
            return False
        if self._state == "arguments":
            return self._send_arguments()
        try:
            if self._read_layout():
                return True
        except _OutOfLayout:
            self._state = "rest"
            return True
        if not final:
            return False
        # the output ended inside the layout: a call begun stays as sent, without what follows
        self._state = "after" if self._state in ("parameters", "close") else "rest"
        return True

    def _read_layout(self) -> bool:
        """Read the text the state expects at the cursor; False while it has not all arrived."""
        text, state = self._text, self._state
        if state == "separator":
            at = _skip_space(text, self._cursor)
            if at == len(text):
                return False
            if text[at] not in ",]":
                raise _OutOfLayout
            self._state = "item" if text[at] == "," else "after"
            self._cursor = at + 1
            return True
        end = _layout_end(text, self._cursor, _LAYOUT[state])
        if end is None:
            return False
        if state == "open":
            self._state, self._cursor = "item", end
        elif state == "item":
            name_end = _string_end(text, end)
            if name_end is None:
                return False
            try:
                name = json_text.loads(text[end - 1 : name_end])
            except ValueError:
                raise _OutOfLayout from None
            self._begin_call(name)
            self._skip(name_end)
            self._state, self._cursor = "parameters", name_end
        elif state == "parameters":
            self._skip(end - 1)  # the arguments begin at the "{"
            self._parameters = BracketEnd(end - 1)
            self._state = "arguments"
        else:
            self._skip(end)
            self._state, self._cursor = "separator", end
        return True

    def _send_arguments(self) -> bool:
        """Send the parameters' text as it arrives, up to the brace that closes them."""
        assert self._parameters is not None
        end = self._parameters.end(self._text)
        self._arguments(self._text[self._pos : end])
        if end is None:
            self._skip(len(self._text))
            return False
        self._skip(end)
        self._parameters = None
        self._state, self._cursor = "close", end
        return True


class _OutOfLayout(Exception):
    """The text is not the grammar's layout of a "required" output."""


# the fixed text each state expects, in order, with whitespace before each piece; "item"
# stops at the name's opening quote, "parameters" at the parameters' opening brace
_LAYOUT = {
    "open": ("[",),
    "item": ("{", '"name"', ":", '"'),
    "parameters": (",", '"parameters"', ":", "{"),
    "close": ("}",),
}
_STRING_REST = re.compile(r'(?:[^"\\]|\\.)*"', re.DOTALL)


def _skip_space(text: str, at: int) -> int:
    while at < len(text) and text[at] in _WHITESPACE:
        at += 1
    return at


def _layout_end(text: str, at: int, pieces: tuple[str, ...]) -> int | None:
    """Where `pieces`, written from `at`, end; None while the text may still grow into them."""
    for piece in pieces:
        at = _skip_space(text, at)
        written = text[at : at + len(piece)]
        if not piece.startswith(written):
            raise _OutOfLayout
        if len(written) < len(piece):
            return None
        at += len(piece)
    return at


def _string_end(text: str, at: int) -> int | None:
    """The index past the quote closing the JSON string whose text begins at `at`; None
    while it is open."""
    found = _STRING_REST.match(text, at)
    return found.end() if found is not None else None
