"""The scorer interface: each scorer rates every candidate from 0 (worst) to 1 (best)
on one aspect; the policy weighs and adds the ratings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from router.policy.request_view import RequestView
from router.worker_state import WorkerState


class Scorer(Protocol):
    name: str

    def score(self, request: RequestView, workers: Sequence[WorkerState]) -> list[float]:
        """One rating per worker, in the same order, each from 0 to 1."""
        ...


def lower_is_better(values: Sequence[float]) -> list[float]:
    """Rate each value by how far it stays below the largest: 1 - value / max.

    Dividing by the largest (rather than stretching min..max onto 0..1) keeps a small
    difference small: two workers with 100 and 101 queued tokens rate almost the same.
    All values zero rate 1.
    """
    top = max(values, default=0)
    if top <= 0:
        return [1.0] * len(values)
    return [1.0 - max(v, 0) / top for v in values]
