"""Cached-prefix overlap: the share of the prompt's blocks the worker already holds."""

from __future__ import annotations

from collections.abc import Sequence

from router.policy.request_view import RequestView
from router.worker_state import WorkerState


class PrefixOverlapScorer:
    name = "prefix_overlap"

    def score(self, request: RequestView, workers: Sequence[WorkerState]) -> list[float]:
        if request.num_prompt_blocks == 0:
            return [0.0] * len(workers)
        return [request.overlap_of(w.worker_id) / request.num_prompt_blocks for w in workers]
