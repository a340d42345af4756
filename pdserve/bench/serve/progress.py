"""A progress bar on stderr while requests finish, in tqdm's manner:

    bench serve:  42%|████████▍           | 42/100 [00:12<00:16, 3.50 req/s]

Redrawn in place at most ten times a second on a terminal; elsewhere (a log file) one
line every ten seconds and one at the end, so logs stay readable. Torch-free.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

_WIDTH = 20
_TERMINAL_EVERY_S = 0.1
_LOG_EVERY_S = 10.0


class ProgressBar:
    def __init__(
        self, total: int, label: str = "bench serve", stream: TextIO | None = None, enabled: bool = True
    ):
        self.total = total
        self.done = 0
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self._terminal = bool(getattr(self.stream, "isatty", lambda: False)())
        self._start = time.monotonic()
        self._drawn_at = float("-inf")

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._drawn_at >= (_TERMINAL_EVERY_S if self._terminal else _LOG_EVERY_S):
            self._draw(now)

    def close(self) -> None:
        self._draw(time.monotonic())
        if self.enabled and self._terminal:
            self.stream.write("\n")
            self.stream.flush()

    def line(self, now: float | None = None) -> str:
        elapsed = (time.monotonic() if now is None else now) - self._start
        fraction = self.done / self.total if self.total else 1.0
        filled = fraction * _WIDTH
        bar = "█" * int(filled) + (" ▏▎▍▌▋▊▉"[int((filled % 1) * 8)] if int(filled) < _WIDTH else "")
        rate = self.done / elapsed if elapsed > 0 else 0.0
        remaining = (self.total - self.done) / rate if rate > 0 else 0.0
        return (
            f"{self.label}: {fraction * 100:3.0f}%|{bar.ljust(_WIDTH)}| {self.done}/{self.total} "
            f"[{_clock(elapsed)}<{_clock(remaining)}, {rate:.2f} req/s]"
        )

    def _draw(self, now: float) -> None:
        if not self.enabled:
            return
        self._drawn_at = now
        self.stream.write(
            ("\r" if self._terminal else "") + self.line(now) + ("" if self._terminal else "\n")
        )
        self.stream.flush()


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"
