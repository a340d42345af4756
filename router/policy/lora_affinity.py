"""LoRA adapter affinity: a worker that lacks the request's adapter must load it first
(read it from disk into host memory and copy it to the device: `load_ms`, tens of ms for
a rank-16 adapter of an 8B model), so holding it is worth that much time to first token.

The rating prices the load in the estimated-TTFT scorer's unit, against that scorer's
spread: holders rate 1, the others 1 - load / (the largest estimated wait), at least 0.
Weighted like estimated_ttft (1 each), the two add up to ranking workers by estimated wait
plus the load where it is needed. So a holder wins only while its wait is shorter than a
cold worker's by less than one load: a hot adapter's holder fills up until loading it on
a second worker is quicker, and then the adapter spreads (the balance check also leaves
out a holder sent more than its share). A base-model request rates 0 everywhere, which
leaves every total as it was.

The estimate counts queued prompt tokens unless measured speeds are on, so the load is
turned into the prompt tokens a worker prefills meanwhile: at the candidates' mean
measured prefill speed, or FALLBACK_PREFILL_TOKENS_PER_S before any is measured.
"""

from __future__ import annotations

from collections.abc import Sequence

from router.policy.estimated_ttft import EstimatedTTFTScorer
from router.policy.request_view import RequestView
from router.worker_state import WorkerState

FALLBACK_PREFILL_TOKENS_PER_S = 10_000.0  # an 8B model's prefill on one data-center GPU


class LoRAAffinityScorer:
    name = "lora_affinity"

    def __init__(self, ttft: EstimatedTTFTScorer, load_ms: float) -> None:
        if not load_ms >= 0:
            raise ValueError(f"lora_load_ms must be 0 or more, got {load_ms}")
        self.ttft = ttft
        self.load_s = load_ms / 1000

    def load_cost(self, workers: Sequence[WorkerState]) -> float:
        """One adapter load in the estimate's unit (seconds, or prompt tokens prefilled meanwhile)."""
        if self.ttft.use_measured_speed:
            return self.load_s
        measured = [w.prefill_tokens_per_s for w in workers if w.prefill_tokens_per_s]
        return self.load_s * (sum(measured) / len(measured) if measured else FALLBACK_PREFILL_TOKENS_PER_S)

    def score(self, request: RequestView, workers: Sequence[WorkerState]) -> list[float]:
        if request.lora_name is None:
            return [0.0] * len(workers)
        top = max(self.ttft.seconds(request, workers), default=0.0)
        cold = max(1.0 - self.load_cost(workers) / top, 0.0) if top > 0 else 0.0
        return [cold if request.lacks_lora(w.worker_id) else 1.0 for w in workers]
