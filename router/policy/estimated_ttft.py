"""Estimated time to first token on each worker, from what the router measures:

    seconds = (queued prefill tokens + cache_miss_scale × prompt tokens it lacks) / prefill speed

The queue is what the worker reports plus what this router sent since; the tokens it
lacks come from the prefix index (cached overlap credited); the speed is the worker's
own, measured from its load reports (WorkerState.prefill_tokens_per_s), which also
slows when its decode batch grows. A worker not measured yet is taken to run at the mean
speed of those measured, and when none is, all are taken to run alike.

With `use_measured_speed` off (the router's default) every worker is taken to run alike:
on workers of equal hardware the measured speed mostly reflects what each was given
(long contexts prefill slower), and dividing by it sent requests away from their cache
(docs/routing.md has the figures). Turn it on for workers of unequal speed.

`cache_miss_scale` above 1 counts a missing token as more than its compute now: the
prefix computed there takes cache room and splits the prefix's later requests between
two caches. The rating is 1 - seconds / the largest.
"""

from __future__ import annotations

from collections.abc import Sequence

from router.policy.request_view import RequestView
from router.policy.scorer import lower_is_better
from router.worker_state import WorkerState


def prefill_speeds(workers: Sequence[WorkerState]) -> list[float]:
    """Each worker's measured prefill speed; the mean of the measured for the others (1 if none)."""
    measured = [w.prefill_tokens_per_s for w in workers if w.prefill_tokens_per_s]
    fallback = sum(measured) / len(measured) if measured else 1.0
    return [w.prefill_tokens_per_s or fallback for w in workers]


class EstimatedTTFTScorer:
    name = "estimated_ttft"

    def __init__(self, cache_miss_scale: float = 1.0, use_measured_speed: bool = False) -> None:
        if cache_miss_scale < 0:
            raise ValueError(f"cache_miss_scale must be 0 or more, got {cache_miss_scale}")
        self.cache_miss_scale = cache_miss_scale
        self.use_measured_speed = use_measured_speed

    def seconds(self, request: RequestView, workers: Sequence[WorkerState]) -> list[float]:
        """The estimated wait for the first token on each worker (in the speeds' unit)."""
        speeds = prefill_speeds(workers) if self.use_measured_speed else [1.0] * len(workers)
        return [
            (w.queued_prefill_tokens + self.cache_miss_scale * request.new_prefill_tokens_of(w.worker_id))
            / speed
            for w, speed in zip(workers, speeds, strict=True)
        ]

    def score(self, request: RequestView, workers: Sequence[WorkerState]) -> list[float]:
        return lower_is_better(self.seconds(request, workers))
