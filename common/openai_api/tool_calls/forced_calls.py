"""Reading the calls out of an output constrained by tool_choice "required" or a named
function, as a whole and as a stream, like the format parsers.

- named function: the whole output is the arguments of one call to it (vLLM passes it on
  as written); they stream as they are generated.
- "required": the output is [{"name": ..., "parameters": {...}}, ...]; each item becomes a
  call with the parameters re-serialized (default separators, non-ASCII kept) once it
  closes. The grammar makes the output well formed; one cut short by max_tokens keeps the
  calls that closed, and the rest is content.
"""

from __future__ import annotations

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
        # open: before "["; item; separator: "," or "]"; after: past "]", left out;
        # rest: what could not be read, content
        self._state = "open"
        self._item: BracketEnd | None = None

    def _shift(self, consumed: int) -> None:
        self._cursor -= consumed
        if self._item is not None:
            self._item.shift(consumed)

    def _step(self, final: bool) -> bool:
        text = self._text
        if self._state == "rest":
            self._content(len(text))
            return False
        if self._state == "after":
            self._skip(len(text))
            return False
        if self._item is None:
            at = self._cursor
            while at < len(text) and text[at] in _WHITESPACE:
                at += 1
            if at == len(text):
                if final:
                    self._state = "rest"
                    return True
                return False
            expected = {"open": "[", "item": "{", "separator": ",]"}[self._state]
            if text[at] not in expected:
                self._state = "rest"
                return True
            if self._state == "open":
                self._state, self._cursor = "item", at + 1
                return True
            if self._state == "separator":
                self._state = "item" if text[at] == "," else "after"
                self._cursor = at + 1
                return True
            self._item = BracketEnd(at)
        end = self._item.end(text)
        if end is None:
            if not final:
                return False
            self._state, self._item = "rest", None
            return True
        call = _parse_item(text[self._item.start : end])
        self._item = None
        if call is None:
            self._state = "rest"
            return True
        self._call(*call, end=end)
        self._state, self._cursor = "separator", end
        return True


def _parse_item(text: str) -> tuple[str, str] | None:
    try:
        item = json_text.loads(text)
    except ValueError:
        return None
    if not isinstance(item, dict) or not isinstance(item.get("name"), str) or "parameters" not in item:
        return None
    return item["name"], json_text.dumps(item["parameters"])
