"""Stop strings: ending a generation where its text first contains one of them.

The engine sees only token ids, so stop strings are checked on the detokenized text,
delta by delta. Two rules make streaming safe:

- The stop that ends first in the text wins (on a tie, the longer one), so the result
  does not depend on how the text was cut into deltas. The text is cut before the
  stop string, or after it with include_stop_str_in_output.
- Text that might be the start of a stop string is held back until the next delta
  settles it, so a streaming client never sees part of a stop string that is then
  taken away. When the generation ends for another reason, `finish()` hands it out.
  (With include_stop_str_in_output nothing is held: the text is cut after the stop,
  which ends after everything shown before.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class StopCheck:
    text: str  # the text to hand out now
    stopped: bool  # a stop string was found; nothing follows
    stop: str | None = None  # which one


class StopChecker:
    """Finds stop strings in one request's output text, fed delta by delta."""

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False):
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop strings must be non-empty strings, got {list(stop)!r}")
        self.stop = tuple(dict.fromkeys(stop))
        self.include_stop_str_in_output = include_stop_str_in_output
        self._longest = max((len(s) for s in self.stop), default=0)
        self._text = ""  # all text fed so far, cut at the stop once one is found
        self._num_shown = 0
        self._stopped: str | None = None

    @property
    def text(self) -> str:
        """The output text so far: everything fed, cut at the stop string if one was found."""
        return self._text

    @property
    def stopped(self) -> bool:
        return self._stopped is not None

    def step(self, delta: str) -> StopCheck:
        """Add the next piece of output text; return what may be shown now."""
        if self._stopped is not None:
            return StopCheck("", True, self._stopped)
        search_from = max(0, len(self._text) - self._longest + 1)
        self._text += delta
        hit = self._earliest_stop(search_from)
        if hit is not None:
            at, stop = hit
            self._text = self._text[: at + len(stop)] if self.include_stop_str_in_output else self._text[:at]
            self._stopped = stop
            return StopCheck(self._take(len(self._text)), True, stop)
        if self.include_stop_str_in_output:
            # a stop found later ends after everything fed so far, so nothing shown is cut
            return StopCheck(self._take(len(self._text)), False)
        return StopCheck(self._take(len(self._text) - self._partial_stop_length()), False)

    def finish(self) -> str:
        """The held-back text, for a generation that ended without a stop string."""
        return self._take(len(self._text))

    def _earliest_stop(self, search_from: int) -> tuple[int, str] | None:
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self.stop:
            at = self._text.find(stop, search_from)
            if at >= 0:
                candidate = (at + len(stop), at, stop)
                if best is None or candidate[:2] < best[:2]:
                    best = candidate
        return None if best is None else (best[1], best[2])

    def _partial_stop_length(self) -> int:
        """Length of the longest tail of the text that a stop string starts with."""
        text = self._text
        for length in range(min(self._longest - 1, len(text) - self._num_shown), 0, -1):
            tail = text[-length:]
            if any(stop.startswith(tail) for stop in self.stop):
                return length
        return 0

    def _take(self, end: int) -> str:
        end = max(end, self._num_shown)
        shown = self._text[self._num_shown : end]
        self._num_shown = end
        return shown
