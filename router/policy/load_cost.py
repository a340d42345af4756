"""The load a request would find on a worker, in KV blocks, cache hits credited:

    cost = prefill_load_scale * (queued prefill blocks + cache_miss_scale * missing prompt blocks)
           + active KV blocks

The first term is the prefill work waiting there once this prompt joins: what is queued,
plus the prompt blocks the worker does not hold. The second is the memory its running
sequences hold (their decode load). Because the cache credit and the queue are in the
same unit, a well-cached worker wins only while its queue is shorter than the work the
cache saves, which is what keeps cache affinity from piling every request on one worker.

`cache_miss_scale` above 1 counts a missing block as more than the compute it costs now:
computing a prefix on a second worker also spends that worker's cache room and splits
the later requests of that prefix between two caches, so a miss costs hit rate later.
The rating is 1 - cost / max cost.
"""

from __future__ import annotations

from collections.abc import Sequence

from router.policy.request_view import RequestView
from router.policy.scorer import lower_is_better
from router.worker_state import WorkerState


class LoadCostScorer:
    name = "load_cost"

    def __init__(self, prefill_load_scale: float = 1.0, cache_miss_scale: float = 1.0) -> None:
        if prefill_load_scale < 0:
            raise ValueError(f"prefill_load_scale must be 0 or more, got {prefill_load_scale}")
        if cache_miss_scale < 0:
            raise ValueError(f"cache_miss_scale must be 0 or more, got {cache_miss_scale}")
        self.prefill_load_scale = prefill_load_scale
        self.cache_miss_scale = cache_miss_scale

    def cost(self, request: RequestView, worker: WorkerState) -> float:
        bs = request.block_size
        queued_blocks = -(-worker.queued_prefill_tokens // bs)
        prompt_blocks = -(-request.num_prompt_tokens // bs)
        missing_blocks = max(prompt_blocks - request.overlap_of(worker.worker_id), 0)
        prefill = queued_blocks + self.cache_miss_scale * missing_blocks
        return self.prefill_load_scale * prefill + worker.active_kv_blocks

    def score(self, request: RequestView, workers: Sequence[WorkerState]) -> list[float]:
        return lower_is_better([self.cost(request, w) for w in workers])
