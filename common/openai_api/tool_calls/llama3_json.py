"""`--tool-call-parser llama3_json` (and vLLM's alias llama4_json): Llama 3.1 and 3.2 answer
a tool call with the JSON alone, {"name": ..., "parameters": {...}} ("arguments" also read),
optionally after <|python_tag|>, several separated by ";".

As vLLM's stream reads them, the output is calls only when it starts (leading whitespace
aside) with <|python_tag|> or "{"; anything else is all content. The arguments are
re-serialized (default separators, non-ASCII kept). An object that is not a well-formed
call makes the rest of the output content, from the start of the output when it is the
first; text after the last call is left out.
"""

from __future__ import annotations

from common.openai_api.tool_calls import json_text
from common.openai_api.tool_calls.json_text import BracketEnd
from common.openai_api.tool_calls.parser import ToolCallStream, ToolParser

PYTHON_TAG = "<|python_tag|>"
_WHITESPACE = " \t\r\n"
_SEPARATORS = _WHITESPACE + ";"


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"

    def stream(self) -> ToolCallStream:
        return _Llama3JsonStream()


def parse_call(text: str) -> tuple[str, str] | None:
    try:
        call = json_text.loads(text)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        return None
    if "arguments" in call:
        return call["name"], json_text.dumps(call["arguments"])
    if "parameters" in call:
        return call["name"], json_text.dumps(call["parameters"])
    return None


def _skip_whitespace(text: str, at: int, chars: str = _WHITESPACE) -> int:
    while at < len(text) and text[at] in chars:
        at += 1
    return at


class _Llama3JsonStream(ToolCallStream):
    def __init__(self) -> None:
        super().__init__()
        self._mode = "lead"  # lead: not yet known; calls; content: all the rest is content; done
        self._cursor = 0  # in calls mode: where the next object (or separator) is looked for
        self._object: BracketEnd | None = None

    def _shift(self, consumed: int) -> None:
        self._cursor -= consumed
        if self._object is not None:
            self._object.shift(consumed)

    def _step(self, final: bool) -> bool:
        if self._mode == "lead":
            return self._lead(final)
        if self._mode == "calls":
            return self._calls(final)
        end = len(self._text)
        if self._mode == "content":
            self._content(end)
        else:
            self._skip(end)
        return False

    def _lead(self, final: bool) -> bool:
        text = self._text
        first = _skip_whitespace(text, self._pos)
        rest = text[first : first + len(PYTHON_TAG)]
        if rest.startswith(PYTHON_TAG):
            self._mode, self._cursor = "calls", first + len(PYTHON_TAG)
        elif rest.startswith("{"):
            self._mode, self._cursor = "calls", first
        elif not final and PYTHON_TAG.startswith(rest):  # nothing yet, or part of the tag
            return False
        else:
            self._mode = "content"
        return True

    def _calls(self, final: bool) -> bool:
        text = self._text
        if self._object is None:
            at = _skip_whitespace(text, self._cursor, _SEPARATORS if self.tools_called else _WHITESPACE)
            if at == len(text):
                if not final:
                    return False
                self._mode = "done" if self.tools_called else "content"
                return True
            if text[at] != "{":
                self._mode = "done" if self.tools_called else "content"
                return True
            self._object = BracketEnd(at)
        end = self._object.end(text)
        if end is None:
            if not final:
                return False
            self._malformed()
            return True
        call = parse_call(text[self._object.start : end])
        if call is None:
            self._malformed()
            return True
        self._object = None
        self._call(*call, end=end)
        self._cursor = end
        return True

    def _malformed(self) -> None:
        if self._object is not None and self.tools_called:
            self._skip(self._object.start)
        self._object = None
        self._mode = "content"
