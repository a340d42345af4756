"""Running sequences: a smaller batch decodes each token sooner."""

from __future__ import annotations

from collections.abc import Sequence

from router.policy.request_view import RequestView
from router.policy.scorer import lower_is_better
from router.worker_state import WorkerState


class RunningRequestsScorer:
    name = "running_requests"

    def score(self, request: RequestView, workers: Sequence[WorkerState]) -> list[float]:
        return lower_is_better([w.num_active_requests for w in workers])
