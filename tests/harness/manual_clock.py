"""A clock the test moves by hand (`clock.now += 0.5`), for the router's and the
workers' time-dependent state (load reports, routed-work decay, pending prefixes)."""

from __future__ import annotations


class ManualClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
