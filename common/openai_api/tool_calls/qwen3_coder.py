"""`--tool-call-parser qwen3_coder`: Qwen3-Coder (and Qwen3.5) write calls as XML-like tags,

    <tool_call>
    <function=NAME>
    <parameter=KEY>
    value
    </parameter>
    ...
    </function>
    </tool_call>

with each value as plain text, converted by the type its parameter has in the tool's
schema (parameter_values.py).

As vLLM reads them: the text before the first call is content; a bare <function=...> also
starts a call; a </parameter> only closes a value when a tag follows it (another
<parameter=KEY> of the tool, </function>, </tool_call>) or the output ends, so values may
contain the tags as text; a call cut off by the end of the output keeps what it has. The
arguments stream one parameter at a time, as {"KEY": value, ...} with default separators.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from common.openai_api.tool_calls.parameter_values import convert_parameter
from common.openai_api.tool_calls.parser import ToolCallStream, ToolParser, held_back_from
from common.openai_api.tool_calls.tools import parameter_properties

TOOL_CALL = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
FUNCTION = "<function="
FUNCTION_END = "</function>"
PARAMETER = "<parameter="
PARAMETER_END = "</parameter>"
_CLOSERS = re.compile(re.escape(PARAMETER_END) + "|" + re.escape(FUNCTION_END))
_NOT_IN_NAME = re.compile(r"[{}<>\"'\s]")
_MAX_NAME = 256
_WHITESPACE = " \t\r\n"


class Qwen3CoderToolParser(ToolParser):
    name = "qwen3_coder"

    def stream(self) -> ToolCallStream:
        return _Qwen3CoderStream(self.tools)


def _skip_whitespace(text: str, at: int) -> int:
    while at < len(text) and text[at] in _WHITESPACE:
        at += 1
    return at


class _Qwen3CoderStream(ToolCallStream):
    def __init__(self, tools: Sequence[Mapping[str, Any]]) -> None:
        super().__init__()
        self._tools = tools
        self._mode = "outside"  # outside, function (its name), body, value
        self._function_at = 0  # mode function: where <function= starts
        self._properties: dict[str, Any] = {}
        self._parameters = 0  # parameters sent for the open call
        self._parameter = ""  # mode value: its parameter's name
        self._search = 0  # mode value: where to look for its closing tag

    def _shift(self, consumed: int) -> None:
        self._function_at -= consumed
        self._search = max(0, self._search - consumed)

    def _step(self, final: bool) -> bool:
        if self._mode == "outside":
            return self._outside_calls(final)
        if self._mode == "function":
            return self._function(final)
        if self._mode == "body":
            return self._body(final)
        return self._value(final)

    def _outside_calls(self, final: bool) -> bool:
        text, pos = self._text, self._pos
        starts = [at for at in (text.find(TOOL_CALL, pos), text.find(FUNCTION, pos)) if at != -1]
        if not starts:
            self._outside(len(text) if final else held_back_from(text, pos, (TOOL_CALL, FUNCTION)))
            return self._pos > pos
        start = min(starts)
        if start > pos:
            self._outside(start)
            return True
        if not text.startswith(TOOL_CALL, pos):
            self._mode, self._function_at = "function", pos
            return True
        at = _skip_whitespace(text, pos + len(TOOL_CALL))
        if text.startswith(FUNCTION, at):
            self._mode, self._function_at = "function", at
            return True
        if not final and FUNCTION.startswith(text[at:]):  # whitespace so far, or part of the tag
            return False
        self._outside(pos + len(TOOL_CALL))  # a <tool_call> that opens no function is text
        return True

    def _function(self, final: bool) -> bool:
        text = self._text
        name_at = self._function_at + len(FUNCTION)
        close = text.find(">", name_at, name_at + _MAX_NAME + 1)
        name = text[name_at : close if close != -1 else name_at + _MAX_NAME + 1]
        if close == -1 and not final and len(name) <= _MAX_NAME and not _NOT_IN_NAME.search(name):
            return False
        if close == -1 or not name or _NOT_IN_NAME.search(name):
            self._outside(name_at)  # not a call: the tags so far are text
            self._mode = "outside"
            return True
        self._begin_call(name)
        self._skip(close + 1)
        self._mode, self._parameters = "body", 0
        self._properties = parameter_properties(self._tools, name)
        return True

    def _body(self, final: bool) -> bool:
        text = self._text
        at = _skip_whitespace(text, self._pos)
        if text.startswith(FUNCTION_END, at):
            self._close_call(at + len(FUNCTION_END))
            return True
        if text.startswith(PARAMETER, at):
            name_at = at + len(PARAMETER)
            close = text.find(">", name_at, name_at + _MAX_NAME + 1)
            if close != -1:
                value_at = close + 1
                if value_at == len(text) and not final:
                    return False  # the newline that opens the value may follow
                if text.startswith("\n", value_at):
                    value_at += 1
                self._parameter = text[name_at:close]
                self._skip(value_at)
                self._mode, self._search = "value", value_at
                return True
            if not final and len(text) - name_at <= _MAX_NAME:
                return False
            self._skip(name_at)  # a parameter tag that never closes: left out
            return True
        if at == len(text) or (
            not final and (FUNCTION_END.startswith(text[at:]) or PARAMETER.startswith(text[at:]))
        ):
            if not final:
                return False
            self._close_call(len(text))  # the output ended inside the call
            return True
        # text between parameters that is no tag: left out up to the next tag
        tags = [found for found in (text.find(PARAMETER, at), text.find(FUNCTION_END, at)) if found != -1]
        if tags:
            self._skip(min(tags))
            return True
        if final:
            self._close_call(len(text))
            return True
        end = held_back_from(text, at, (PARAMETER, FUNCTION_END))
        moved = end > self._pos
        self._skip(end)
        return moved

    def _value(self, final: bool) -> bool:
        text = self._text
        while True:
            found = _CLOSERS.search(text, self._search)
            if found is None:
                if not final:
                    self._search = max(self._pos, len(text) - len(PARAMETER_END) + 1)
                    return False
                self._send_parameter(text[self._pos :])
                self._skip(len(text))
                self._mode = "body"
                return True
            closes = self._closes_value(found.group(), found.end(), final)
            if closes is None:
                self._search = found.start()
                return False
            if closes:
                break
            self._search = found.start() + 1
        self._send_parameter(text[self._pos : found.start()])
        self._skip(found.end() if found.group() == PARAMETER_END else found.start())
        self._mode = "body"
        return True

    def _closes_value(self, closer: str, after: int, final: bool) -> bool | None:
        """Whether the tag found in a value ends it; None until the text after it tells."""
        text = self._text
        at = _skip_whitespace(text, after)
        if at == len(text):
            return True if final else None
        followers = (PARAMETER, FUNCTION_END, TOOL_CALL_END) if closer == PARAMETER_END else (TOOL_CALL_END,)
        for follower in followers:
            if text.startswith(follower, at):
                if follower != PARAMETER or not self._properties:
                    return True
                name_at = at + len(PARAMETER)
                close = text.find(">", name_at, name_at + _MAX_NAME + 1)
                if close == -1:
                    return None if not final and len(text) - name_at <= _MAX_NAME else False
                return text[name_at:close] in self._properties
            if follower.startswith(text[at:]):
                return True if final else None
        return False

    def _send_parameter(self, raw: str) -> None:
        if raw.endswith("\n"):
            raw = raw[:-1]
        value = convert_parameter(raw, self._properties.get(self._parameter))
        key = json.dumps(self._parameter, ensure_ascii=False)
        self._arguments(
            ("{" if self._parameters == 0 else ", ") + key + ": " + json.dumps(value, ensure_ascii=False)
        )
        self._parameters += 1

    def _close_call(self, end: int) -> None:
        self._arguments("}" if self._parameters else "{}")
        self._skip(end)
        self._mode = "outside"
