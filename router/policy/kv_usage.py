"""KV-cache usage: a fuller cache preempts sooner and evicts the prefixes it could reuse."""

from __future__ import annotations

from collections.abc import Sequence

from router.policy.request_view import RequestView
from router.worker_state import WorkerState


class KVUsageScorer:
    name = "kv_usage"

    def score(self, request: RequestView, workers: Sequence[WorkerState]) -> list[float]:
        return [1.0 - w.kv_usage for w in workers]
