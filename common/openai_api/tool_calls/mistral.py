"""`--tool-call-parser mistral`: Mistral models start their calls with [TOOL_CALLS], in one of
two forms, recognised by what follows the marker:

- before tokenizer v11: [TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...], a JSON list;
  the arguments are re-serialized (default separators, non-ASCII kept), "{}" when absent;
- v11 and later: [TOOL_CALLS]name[ARGS]{...} (or name{...}), once per call; the arguments
  are the JSON object as written.

As vLLM reads them, text before the first marker is content and what follows a group's
calls up to the next marker is left out. A group that is not well formed (a name that is
not one, JSON that does not parse or never closes) stays content from where it went wrong
to the next marker; vLLM instead keeps a v11 call with bad arguments as a call.
"""

from __future__ import annotations

import re

from common.openai_api.tool_calls import json_text
from common.openai_api.tool_calls.json_text import BracketEnd
from common.openai_api.tool_calls.parser import ToolCallStream, ToolParser, held_back_from

BOT = "[TOOL_CALLS]"
ARGS = "[ARGS]"
_NAME = re.compile(r"[\w.\-]+")
_MAX_NAME = 256  # a "name" this long without its arguments is prose, not a call
_WHITESPACE = " \t\r\n"


class MistralToolParser(ToolParser):
    name = "mistral"

    def stream(self) -> ToolCallStream:
        return _MistralStream()


def _skip_whitespace(text: str, at: int, limit: int) -> int:
    while at < limit and text[at] in _WHITESPACE:
        at += 1
    return at


class _MistralStream(ToolCallStream):
    def __init__(self) -> None:
        super().__init__()
        # group: None outside calls; "start" just after a marker; "named" or "list" while
        # reading calls; "after" leaving out what follows them; "malformed" sending content
        self._group: str | None = None
        self._cursor = 0
        self._region_end: int | None = None  # the next marker, once seen
        self._marker_search = 0
        self._object: BracketEnd | None = None
        self._expect_item = True  # list form: an item comes next, not "," or "]"
        self._items = 0  # list form: the calls read from this list
        self._name = ""  # v11 form: the name of the call whose arguments are being read

    def _shift(self, consumed: int) -> None:
        self._cursor -= consumed
        self._marker_search = max(0, self._marker_search - consumed)
        if self._region_end is not None:
            self._region_end -= consumed
        if self._object is not None:
            self._object.shift(consumed)

    def _step(self, final: bool) -> bool:
        text, pos = self._text, self._pos
        if self._group is None:
            marker = text.find(BOT, pos)
            if marker == -1:
                self._outside(len(text) if final else held_back_from(text, pos, (BOT,)))
                return self._pos > pos
            if marker > pos:
                self._outside(marker)
                return True
            self._group, self._cursor = "start", pos + len(BOT)
            self._region_end, self._marker_search = None, self._cursor
            return True

        complete, limit = self._region(final)
        if self._group == "after":
            self._skip(limit)
        elif self._group == "malformed":
            self._content(limit)
        elif self._group == "start":
            return self._start(complete, limit)
        elif self._group == "named":
            return self._named(complete, limit)
        else:
            return self._list(complete, limit)
        if complete:
            self._group = None
            return True
        return self._pos > pos

    def _region(self, final: bool) -> tuple[bool, int]:
        """(whether the group's end is known, how far its text can be read now)."""
        text = self._text
        if self._region_end is None:
            marker = text.find(BOT, self._marker_search)
            if marker != -1:
                self._region_end = marker
            else:
                self._marker_search = max(self._pos, self._cursor, len(text) - len(BOT) + 1)
        if self._region_end is not None:
            return True, self._region_end
        if final:
            return True, len(text)
        return False, held_back_from(text, self._pos, (BOT,))

    def _malformed(self) -> bool:
        self._object = None
        self._group = "malformed"
        return True

    def _start(self, complete: bool, limit: int) -> bool:
        at = _skip_whitespace(self._text, self._cursor, limit)
        if at == limit:
            return self._malformed() if complete else False
        if self._text[at] == "[":
            self._group, self._cursor, self._expect_item, self._items = "list", at + 1, True, 0
        else:
            self._group = "named"
        return True

    def _named(self, complete: bool, limit: int) -> bool:
        text = self._text
        if self._object is None:
            brace = text.find("{", self._cursor, min(limit, self._cursor + _MAX_NAME))
            if brace == -1:
                if complete or limit - self._cursor >= _MAX_NAME:
                    return self._malformed()
                return False
            name = text[self._cursor : brace].replace(ARGS, "").strip()
            if not _NAME.fullmatch(name):
                return self._malformed()
            self._name = name
            self._object = BracketEnd(brace)
        end = self._object.end(text, limit)
        if end is None:
            return self._malformed() if complete else False
        arguments = text[self._object.start : end]
        try:
            json_text.loads(arguments)
        except ValueError:
            return self._malformed()
        self._object = None
        self._call(self._name, arguments, end)
        self._group = "after"
        return True

    def _list(self, complete: bool, limit: int) -> bool:
        text = self._text
        if self._object is None:
            at = _skip_whitespace(text, self._cursor, limit)
            if at == limit:
                return self._malformed() if complete else False
            char = text[at]
            if char == "]" and (not self._expect_item or self._items == 0):
                self._group = "after"
                return True
            if not self._expect_item:
                if char != ",":
                    return self._malformed()
                self._cursor, self._expect_item = at + 1, True
                return True
            if char != "{":
                return self._malformed()
            self._object = BracketEnd(at)
        end = self._object.end(text, limit)
        if end is None:
            return self._malformed() if complete else False
        call = _list_item(text[self._object.start : end])
        if call is None:
            return self._malformed()
        self._object = None
        self._call(*call, end=end)
        self._cursor, self._expect_item, self._items = end, False, self._items + 1
        return True


def _list_item(text: str) -> tuple[str, str] | None:
    """(name, arguments JSON) of one item of the list form, or None when it is not a call."""
    try:
        call = json_text.loads(text)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        return None
    return call["name"], json_text.dumps(call.get("arguments", {}))
