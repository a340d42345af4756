"""The picker: the candidate with the highest total score.

Ties go to the least loaded: fewest queued prefill tokens, then the least prefill work
this picker has sent the worker lately, then fewest active requests, then fewest KV
blocks in use; remaining ties rotate in worker-id order, so equal workers share the work.

Why recent work: at moderate load the workers' queues are empty at most decisions, so
many candidates tie. Rotating among them (or counting requests) evens out the number of
requests, not the work: prompts differ in length by four orders of magnitude, and the
worker that happened to draw the long ones runs hotter, evicts more and answers later.
The picker keeps, per worker, the prefill tokens it routed there, decaying with a
half-life of ROUTED_WORK_HALF_LIFE_S, so equal candidates take turns by work done.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from router.worker_state import WorkerState

# Totals this close count as equal: float sums of the same ratings in another order differ a little.
SCORE_TOLERANCE = 1e-9
# How long routed work counts in the tie-break; `pdserve bench route` found 5 to 20 minutes
# alike on the Mooncake trace (docs/routing.md).
ROUTED_WORK_HALF_LIFE_S = 600.0


def load_key(worker: WorkerState) -> tuple[int, int, int]:
    return (worker.queued_prefill_tokens, worker.num_active_requests, worker.active_kv_blocks)


class MaxScorePicker:
    def __init__(
        self, prefer_least_loaded: bool = True, routed_work_half_life_s: float = ROUTED_WORK_HALF_LIFE_S
    ) -> None:
        if routed_work_half_life_s <= 0:
            raise ValueError(f"routed_work_half_life_s must be positive, got {routed_work_half_life_s}")
        self.prefer_least_loaded = prefer_least_loaded
        self.routed_work_half_life_s = routed_work_half_life_s
        self._turn = 0
        self._routed: dict[Hashable, tuple[float, float]] = {}  # worker id -> (tokens, as of time)

    def pick(self, workers: Sequence[WorkerState], totals: Sequence[float]) -> WorkerState:
        if not workers:
            raise ValueError("nothing to pick from: no candidate workers")
        best = max(totals)
        tied = [w for w, total in zip(workers, totals, strict=True) if total >= best - SCORE_TOLERANCE]
        if len(tied) > 1 and self.prefer_least_loaded:
            keys = {w.worker_id: self._tie_key(w) for w in tied}
            lightest = min(keys.values())
            tied = [w for w in tied if keys[w.worker_id] == lightest]
        if len(tied) == 1:
            return tied[0]
        tied.sort(key=lambda w: str(w.worker_id))
        chosen = tied[self._turn % len(tied)]
        self._turn += 1
        return chosen

    def note_routed(self, worker: WorkerState, prefill_tokens: int) -> None:
        """`worker` was given a request that makes it prefill `prefill_tokens` tokens."""
        now = worker.clock()
        self._routed[worker.worker_id] = (self.routed_work(worker) + prefill_tokens, now)

    def routed_work(self, worker: WorkerState) -> float:
        """Prefill tokens routed to `worker` lately (decayed by age)."""
        tokens, since = self._routed.get(worker.worker_id, (0.0, 0.0))
        if not tokens:
            return 0.0
        age = max(worker.clock() - since, 0.0)
        return tokens * 0.5 ** (age / self.routed_work_half_life_s)

    def _tie_key(self, worker: WorkerState) -> tuple[float, ...]:
        queued, active, kv_blocks = load_key(worker)
        return (queued, self.routed_work(worker), active, kv_blocks)
