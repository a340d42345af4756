"""`--tool-call-parser hermes`: Hermes 2 Pro, Qwen2.5 and Qwen3 write each call as
<tool_call>{"name": ..., "arguments": {...}}</tool_call>, several in a row when they call
several tools.

As vLLM reads them: the text before the first <tool_call> is content; a call still open
when the output ends is read up to the end; the arguments are re-serialized (default
separators, non-ASCII kept). A region whose body is not a JSON object with a string "name"
and an "arguments" key stays content, tags included, while the calls around it still count
(vLLM turns the whole output into content then, which a stream cannot do once it has sent
the calls before it).
"""

from __future__ import annotations

from common.openai_api.tool_calls import json_text
from common.openai_api.tool_calls.parser import ToolCallStream, ToolParser, held_back_from

START = "<tool_call>"
END = "</tool_call>"


class HermesToolParser(ToolParser):
    name = "hermes"

    def stream(self) -> ToolCallStream:
        return _HermesStream()


def parse_call(body: str) -> tuple[str, str] | None:
    """(name, arguments JSON) of one call's body, or None when it is not a well-formed call."""
    try:
        call = json_text.loads(body)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        return None
    if "arguments" not in call:
        return None
    return call["name"], json_text.dumps(call["arguments"])


class _HermesStream(ToolCallStream):
    def __init__(self) -> None:
        super().__init__()
        self._end_search = 0  # where to look for END in the open call's body

    def _shift(self, consumed: int) -> None:
        self._end_search = max(0, self._end_search - consumed)

    def _step(self, final: bool) -> bool:
        text, pos = self._text, self._pos
        start = text.find(START, pos)
        if start == -1:
            end = len(text) if final else held_back_from(text, pos, (START,))
            self._outside(end)
            return self._pos > pos
        if start > pos:
            self._outside(start)
            return True
        body = start + len(START)
        close = text.find(END, max(body, self._end_search))
        if close == -1 and not final:
            self._end_search = max(body, len(text) - len(END) + 1)
            return False
        self._end_search = 0
        body_end, region_end = (len(text), len(text)) if close == -1 else (close, close + len(END))
        call = parse_call(text[body:body_end])
        if call is None:
            self._content(region_end)
        else:
            self._call(*call, end=region_end)
        return True
