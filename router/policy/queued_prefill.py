"""Queued prefill tokens: a worker with fewer prompt tokens still to prefill starts ours sooner."""

from __future__ import annotations

from collections.abc import Sequence

from router.policy.request_view import RequestView
from router.policy.scorer import lower_is_better
from router.worker_state import WorkerState


class QueuedPrefillScorer:
    name = "queued_prefill"

    def score(self, request: RequestView, workers: Sequence[WorkerState]) -> list[float]:
        return lower_is_better([w.queued_prefill_tokens for w in workers])
