"""Reading a chat choice's output as the message the client gets: its reasoning, its
content and its tool calls, whole or as it is generated, and the finish_reason they make.

As vLLM reads it: the --reasoning-parser splits the output first, and only the part after
the reasoning goes to the tool-call reader, which is the --tool-call-parser for
tool_choice "auto" and the reader of the constrained output for "required" and named
functions (tool_calls/forced_calls.py). Both readers are streams, and a whole output is
read by feeding it to a fresh stream, so the pieces of a stream, joined, are the whole
message. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from common.openai_api.reasoning import ReasoningDelta, ReasoningParser, ReasoningStream
from common.openai_api.tool_calls import (
    ContentDelta,
    ToolCall,
    ToolCallDelta,
    ToolCallStream,
    ToolParser,
    collect_deltas,
)

# the engine's finish reasons that a message read from the output may turn into "tool_calls";
# "abort" and the like say the choice failed and stay as they are
_FINISHED_BY_ITSELF = ("stop", "length")


@dataclass
class ChatDelta:
    """What one step added to a choice's message, in the shape of a chunk's `delta`."""

    reasoning_content: str | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return self.reasoning_content is None and self.content is None and not self.tool_calls

    def to_dict(self) -> dict[str, Any]:
        """The chunk's delta: only what it carries; {"content": ""} when it carries nothing."""
        delta: dict[str, Any] = {}
        if self.reasoning_content is not None:
            delta["reasoning_content"] = self.reasoning_content
        if self.content is not None:
            delta["content"] = self.content
        if self.tool_calls:
            delta["tool_calls"] = [call.to_dict() for call in self.tool_calls]
        return delta or {"content": ""}


@dataclass(frozen=True)
class ChatMessageParts:
    """A whole output as the message's fields; empty text is None."""

    reasoning_content: str | None
    content: str | None
    tool_calls: list[ToolCall]


@dataclass(frozen=True)
class ChatOutputReader:
    """How one request's choices are read; `stream()` for each choice."""

    reasoning: ReasoningParser | None = None
    tools: ToolParser | None = None  # the --tool-call-parser, or the reader of a forced choice
    # tool_choice "required" or a named function: the output is calls by construction
    forced: bool = False
    include_reasoning: bool = True  # the request's include_reasoning: false drops reasoning_content

    def stream(self) -> ChoiceStream:
        return ChoiceStream(self)

    def read(self, text: str, finish_reason: str | None) -> tuple[ChatMessageParts, str | None]:
        """The message of a whole output, and the choice's finish_reason."""
        stream = self.stream()
        delta = stream.feed(text, final=True)
        calls = collect_deltas(delta.tool_calls).calls
        parts = ChatMessageParts(delta.reasoning_content, delta.content, calls)
        return parts, stream.finish_reason(finish_reason)


class ChoiceStream:
    """One choice's output, fed as it is generated."""

    def __init__(self, reader: ChatOutputReader) -> None:
        self._reasoning: ReasoningStream | None = (
            reader.reasoning.stream() if reader.reasoning is not None else None
        )
        self._tools: ToolCallStream | None = reader.tools.stream() if reader.tools is not None else None
        self._forced = reader.forced
        self._include_reasoning = reader.include_reasoning

    def feed(self, text: str, final: bool = False) -> ChatDelta:
        """What `text`, added to the output, lets the message show; `final` once the output ended."""
        reasoning, content = None, text
        if self._reasoning is not None:
            first = self._reasoning.feed(text)
            last = self._reasoning.finish() if final else ReasoningDelta(None, None)
            reasoning, content = _join(first.reasoning, last.reasoning), _join(first.content, last.content)
        delta = ChatDelta(reasoning_content=reasoning if self._include_reasoning else None)
        if self._tools is None:
            delta.content = content or None
            return delta
        pieces = self._tools.feed(content or "")
        if final:
            pieces += self._tools.finish()
        delta.content = "".join(p.text for p in pieces if isinstance(p, ContentDelta)) or None
        delta.tool_calls = [p for p in pieces if isinstance(p, ToolCallDelta)]
        return delta

    @property
    def tools_called(self) -> bool:
        return self._tools is not None and self._tools.tools_called

    def finish_reason(self, engine_reason: str | None) -> str | None:
        """The choice's finish_reason: "tool_calls" when it called tools, which a forced choice
        always does unless max_tokens cut it short, and "auto" when the parser found calls
        (vLLM's rule)."""
        if engine_reason not in _FINISHED_BY_ITSELF:
            return engine_reason
        if self._forced:
            return "length" if engine_reason == "length" else "tool_calls"
        return "tool_calls" if self.tools_called else engine_reason


def _join(a: str | None, b: str | None) -> str | None:
    return ((a or "") + (b or "")) or None
