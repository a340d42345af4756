"""The picker: the candidate with the highest total score. Ties go to the least loaded
(fewest queued prefill tokens, then fewest active requests, then fewest KV blocks in
use), and remaining ties rotate in worker-id order, so equal workers share the work."""

from __future__ import annotations

from collections.abc import Sequence

from router.worker_state import WorkerState

# Totals this close count as equal: float sums of the same ratings in another order differ a little.
SCORE_TOLERANCE = 1e-9


def load_key(worker: WorkerState) -> tuple[int, int, int]:
    return (worker.queued_prefill_tokens, worker.num_active_requests, worker.active_kv_blocks)


class MaxScorePicker:
    def __init__(self, prefer_least_loaded: bool = True) -> None:
        self.prefer_least_loaded = prefer_least_loaded
        self._turn = 0

    def pick(self, workers: Sequence[WorkerState], totals: Sequence[float]) -> WorkerState:
        if not workers:
            raise ValueError("nothing to pick from: no candidate workers")
        best = max(totals)
        tied = [w for w, total in zip(workers, totals, strict=True) if total >= best - SCORE_TOLERANCE]
        if len(tied) > 1 and self.prefer_least_loaded:
            lightest = min(load_key(w) for w in tied)
            tied = [w for w in tied if load_key(w) == lightest]
        if len(tied) == 1:
            return tied[0]
        tied.sort(key=lambda w: str(w.worker_id))
        chosen = tied[self._turn % len(tied)]
        self._turn += 1
        return chosen
