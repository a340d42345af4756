"""A model's tool calls as data: one call, what reading a whole output gives, and the pieces
a stream sends.

The shapes are the OpenAI API's: a call is {"id", "type": "function", "function": {"name",
"arguments"}} with the arguments as JSON text; a streamed call is a first piece carrying the
index, id, type and name, then pieces of the arguments text under the same index.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

TOOL_CALL_ID_PREFIX = "chatcmpl-tool-"


def make_tool_call_id() -> str:
    """vLLM's form, "chatcmpl-tool-" and 32 hex digits (OpenAI's is "call_" and 24 letters
    and digits; clients treat the id as opaque and only echo it back in tool messages)."""
    return TOOL_CALL_ID_PREFIX + uuid.uuid4().hex


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as the OpenAI API sends it
    id: str = field(default_factory=make_tool_call_id)

    def to_dict(self) -> dict[str, Any]:
        """The call as it sits in a message's tool_calls list."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(frozen=True)
class ExtractedToolCalls:
    """What a whole output says: the text for `content` (None when the output is only calls)
    and the calls, in the order written."""

    content: str | None
    calls: list[ToolCall]

    @property
    def tools_called(self) -> bool:
        return bool(self.calls)


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ToolCallDelta:
    """One piece of a streamed call: the first piece of each call has id and name and no
    arguments, later ones only arguments; joined in order, they give the call's arguments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The piece as it sits in a chunk's delta.tool_calls list."""
        piece: dict[str, Any] = {"index": self.index}
        if self.id is not None:
            piece["id"] = self.id
            piece["type"] = "function"
        function: dict[str, str] = {}
        if self.name is not None:
            function["name"] = self.name
        if self.arguments is not None:
            function["arguments"] = self.arguments
        piece["function"] = function
        return piece


StreamDelta = ContentDelta | ToolCallDelta


def collect_deltas(deltas: Iterable[StreamDelta]) -> ExtractedToolCalls:
    """The whole-output view of a stream's pieces: content joined, each call's pieces joined.

    Content is None when calls were made and no text came with them, as vLLM answers.
    """
    content: list[str] = []
    headers: dict[int, ToolCallDelta] = {}
    arguments: dict[int, list[str]] = {}
    for delta in deltas:
        if isinstance(delta, ContentDelta):
            content.append(delta.text)
        elif delta.name is not None:
            headers[delta.index] = delta
            arguments[delta.index] = []
        elif delta.arguments is not None:
            arguments[delta.index].append(delta.arguments)
    calls = [
        ToolCall(
            name=header.name or "", arguments="".join(arguments[index]), id=header.id or make_tool_call_id()
        )
        for index, header in sorted(headers.items())
    ]
    text = "".join(content)
    return ExtractedToolCalls(content=text if text or not calls else None, calls=calls)
