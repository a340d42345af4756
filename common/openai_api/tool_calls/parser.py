"""What every tool-call parser offers, and the stream all of them are written as.

A parser reads a whole output (`extract`) or one being generated (`stream`: `feed` each
delta of text, then `finish`). Each format is written once, as a stream: it consumes the
output left to right from a cursor and, at each point, either knows what the text before
the cursor is (content, a call, text to leave out) or waits for more. `extract` feeds the
whole output to a fresh stream, so the two cannot disagree: a stream's pieces, joined,
are what `extract` gives, however the output was cut into deltas.

Pieces once sent cannot be taken back, which gives the two rules every format follows:
text that could be the start of a call marker is held back until it is known not to be
one; and a call read from free text is sent only once it is known to be well formed,
since a malformed one (bad JSON, a truncated output) stays content. A format whose
arguments are one JSON value written freely by the model (hermes, llama3_json, mistral)
therefore sends them in one piece when the value closes; a format whose arguments are
built from parts (qwen3_coder's parameters) sends each part as it completes. Output
written under a grammar (tool_choice "required" or a named function, forced_calls.py) is
well formed by construction, so its arguments stream as they are written.

As vLLM's parsers do, text outside calls is content until the first call and left out
after it (the newlines between calls, anything after the last one).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

from common.openai_api.tool_calls.tool_call import (
    ContentDelta,
    ExtractedToolCalls,
    StreamDelta,
    ToolCallDelta,
    collect_deltas,
    make_tool_call_id,
)


class ToolCallStream(ABC):
    """One choice's output, fed as it is generated.

    Subclasses implement `_step` over `self._text` from `self._pos` and report what they
    consumed with `_content`, `_outside`, `_skip`, `_call`, `_begin_call`, `_arguments`.
    Consumed text is dropped between feeds; a subclass that keeps positions into the text
    moves them back in `_shift`.
    """

    def __init__(self) -> None:
        self._text = ""
        self._pos = 0
        self._out: list[StreamDelta] = []
        self._index = -1  # the index of the latest call begun
        self._finished = False

    def feed(self, delta_text: str) -> list[StreamDelta]:
        """The pieces that `delta_text`, added to the output, lets the stream send."""
        if self._finished:
            raise RuntimeError("this stream is finished; start a new one for another output")
        self._text += delta_text
        return self._run(final=False)

    def finish(self) -> list[StreamDelta]:
        """The pieces held back until the output ended."""
        if self._finished:
            return []
        self._finished = True
        return self._run(final=True)

    @property
    def tools_called(self) -> bool:
        """Whether a call has been sent (the choice's finish_reason becomes "tool_calls")."""
        return self._index >= 0

    def _run(self, final: bool) -> list[StreamDelta]:
        while self._step(final):
            pass
        if self._pos:
            self._text = self._text[self._pos :]
            self._shift(self._pos)
            self._pos = 0
        out, self._out = self._out, []
        return out

    @abstractmethod
    def _step(self, final: bool) -> bool:
        """Consume what can be decided at the cursor; True if the cursor moved.

        With final set the output is complete: every step must then move the cursor until
        the whole text is consumed.
        """

    def _shift(self, consumed: int) -> None:  # noqa: B027 (optional: most streams keep positions)
        """The first `consumed` characters of the text were dropped."""

    def _content(self, end: int) -> None:
        if end > self._pos:
            self._out.append(ContentDelta(self._text[self._pos : end]))
        self._pos = end

    def _outside(self, end: int) -> None:
        """Text outside calls: content before the first call, left out after it."""
        if self.tools_called:
            self._pos = end
        else:
            self._content(end)

    def _skip(self, end: int) -> None:
        self._pos = end

    def _begin_call(self, name: str) -> None:
        self._index += 1
        self._out.append(ToolCallDelta(index=self._index, id=make_tool_call_id(), name=name))

    def _arguments(self, piece: str) -> None:
        if piece:
            self._out.append(ToolCallDelta(index=self._index, arguments=piece))

    def _call(self, name: str, arguments: str, end: int) -> None:
        """A whole call, ending the consumed text at `end`."""
        self._begin_call(name)
        self._arguments(arguments)
        self._pos = end


class ToolParser(ABC):
    """One --tool-call-parser for one request; `tools` are the request's tool definitions
    (qwen3_coder reads parameter types from them)."""

    name: ClassVar[str]

    def __init__(self, tools: Sequence[Mapping[str, Any]] | None = None) -> None:
        self.tools = list(tools or [])

    @abstractmethod
    def stream(self) -> ToolCallStream:
        """A fresh stream for one choice's output."""

    def extract(self, text: str) -> ExtractedToolCalls:
        """The content and calls of a whole output; malformed calls stay content."""
        stream = self.stream()
        return collect_deltas([*stream.feed(text), *stream.finish()])


def held_back_from(text: str, start: int, markers: Iterable[str]) -> int:
    """Where the text that can be sent ends: the end of `text`, less the longest tail of
    text[start:] that is the beginning of one of `markers` (it may grow into a marker)."""
    longest = 0
    for marker in markers:
        for length in range(min(len(marker) - 1, len(text) - start), longest, -1):
            if text.endswith(marker[:length]):
                longest = length
                break
    return len(text) - longest
