"""What a --reasoning-parser offers: splitting an output into its reasoning
(`reasoning_content`) and its answer (`content`), whole (`extract`) or as it is generated
(`stream`), with one rule behind both.

The parsers here read reasoning written between <think> and </think>. An opening <think>
counts only at the very start of the output (whitespace before it is dropped); reasoning
ends at the first </think>, or with the output when it is cut short; everything after is
content, the newlines the model writes after </think> included, as in vLLM. What an output
that does not open with <think> is differs by model: DeepSeek-R1's template puts <think> in
the prompt, so its output starts inside the reasoning; Qwen3 writes <think> itself when it
thinks, so without one the output is all content.

`extract` feeds the whole output to a fresh stream, so a stream's pieces, joined, are what
`extract` gives however the output was cut; part of a tag at the end of a delta is held
back until the next delta settles it. Empty reasoning or content is None, as vLLM answers.
"""

from __future__ import annotations

from abc import ABC
from typing import ClassVar, NamedTuple

from common.openai_api.tool_calls.parser import held_back_from

_WHITESPACE = " \t\r\n"


class ReasoningDelta(NamedTuple):
    reasoning: str | None
    content: str | None


class ReasoningStream:
    """One choice's output, fed as it is generated."""

    def __init__(self, parser: ReasoningParser) -> None:
        self._start = parser.start_token
        self._end = parser.end_token
        self._starts_in_reasoning = parser.starts_in_reasoning
        self._text = ""
        self._phase = "lead"  # lead: before the first non-space text; reasoning; content
        self._finished = False

    def feed(self, delta_text: str) -> ReasoningDelta:
        """The reasoning and content that `delta_text`, added to the output, lets the stream send."""
        if self._finished:
            raise RuntimeError("this stream is finished; start a new one for another output")
        self._text += delta_text
        return self._run(final=False)

    def finish(self) -> ReasoningDelta:
        """What was held back until the output ended."""
        if self._finished:
            return ReasoningDelta(None, None)
        self._finished = True
        return self._run(final=True)

    @property
    def in_reasoning(self) -> bool:
        """Whether the text fed so far ends inside the reasoning."""
        return self._phase == "reasoning" or (self._phase == "lead" and self._starts_in_reasoning)

    def _run(self, final: bool) -> ReasoningDelta:
        reasoning, content = [], []
        text, pos = self._text, 0
        while pos < len(text) or (final and self._phase == "lead"):
            if self._phase == "lead":
                first = pos
                while first < len(text) and text[first] in _WHITESPACE:
                    first += 1
                head = text[first : first + len(self._start)]
                if head.startswith(self._start):
                    self._phase, pos = "reasoning", first + len(self._start)
                elif not final and self._start.startswith(head):  # nothing yet, or part of <think>
                    break
                else:
                    self._phase = "reasoning" if self._starts_in_reasoning else "content"
            elif self._phase == "reasoning":
                end = text.find(self._end, pos)
                if end == -1:
                    stop = len(text) if final else held_back_from(text, pos, (self._end,))
                    reasoning.append(text[pos:stop])
                    pos = stop
                    break
                reasoning.append(text[pos:end])
                self._phase, pos = "content", end + len(self._end)
            else:
                content.append(text[pos:])
                pos = len(text)
        self._text = text[pos:]
        return ReasoningDelta("".join(reasoning) or None, "".join(content) or None)


class ReasoningParser(ABC):
    """One --reasoning-parser: stateless; `stream()` for each choice."""

    name: ClassVar[str]
    start_token: ClassVar[str] = "<think>"
    end_token: ClassVar[str] = "</think>"
    starts_in_reasoning: ClassVar[bool]  # an output without the start token is reasoning

    def stream(self) -> ReasoningStream:
        return ReasoningStream(self)

    def extract(self, text: str) -> tuple[str | None, str | None]:
        """(reasoning_content, content) of a whole output."""
        stream = self.stream()
        first, last = stream.feed(text), stream.finish()
        return _join(first.reasoning, last.reasoning), _join(first.content, last.content)


def _join(a: str | None, b: str | None) -> str | None:
    return ((a or "") + (b or "")) or None
