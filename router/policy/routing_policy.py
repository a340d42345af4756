"""The routing policy: keep the healthy candidates, rate them with weighted scorers, and
let the picker take the best.

    policy = RoutingPolicy(index, block_size=16)
    worker, decision = policy.choose(decode_workers, block_hashes, len(prompt), lora_name=None)
    worker.note_request_sent(request_id, decision.new_prefill_tokens, ...)

`choose` changes nothing but the picker's tie-break state (its rotation and the work it
has routed to each worker) and the policy's note of what it just sent where (the prompt's
blocks and its adapter count as held there for a while): the caller notes the request
on the worker it sends it to.
A scorer with weight 0 is left out of the pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from router.policy.estimated_ttft import EstimatedTTFTScorer
from router.policy.kv_usage import KVUsageScorer
from router.policy.load_cost import LoadCostScorer
from router.policy.lora_affinity import LoRAAffinityScorer
from router.policy.lora_holders import LoRAHolders
from router.policy.pending_prefixes import PendingPrefixes
from router.policy.picker import MaxScorePicker
from router.policy.prefix_overlap import PrefixOverlapScorer
from router.policy.queued_prefill import QueuedPrefillScorer
from router.policy.request_view import RequestView
from router.policy.running_requests import RunningRequestsScorer
from router.policy.scorer import Scorer
from router.prefix_index import PrefixIndex
from router.worker_state import WorkerState


class NoWorkerAvailable(RuntimeError):
    """No healthy worker among the candidates."""


@dataclass(frozen=True)
class PolicyWeights:
    """The router's defaults (docs/routing.md says why, from `pdserve bench route` tuned on
    the Mooncake trace and three synthetic workloads, then checked once on workloads held
    out): route by the estimated time to first token (queue plus the prompt tokens a worker
    lacks, a missing token counted as 6 queued ones, a prompt sent in the last second
    counted as cached where it went), nudge toward the longer cached prefix among workers
    of similar estimate, and leave out a worker that this request's work would take more
    than 5 % above the mean prefill work lately, unless that moves a long cached context
    for a small excess; SGLang falls back to the shortest queue on imbalance alike. A request
    naming a LoRA adapter also counts the adapter's load (50 ms) where it is not held."""

    prefix_overlap: float = 0.1
    estimated_ttft: float = 1.0
    load_cost: float = 0.0
    queued_prefill: float = 0.0
    running_requests: float = 0.0
    kv_usage: float = 0.0
    # of EstimatedTTFTScorer and LoadCostScorer: a missing prompt token (block) against a queued one
    cache_miss_scale: float = 6.0
    # of EstimatedTTFTScorer: 1 divides by each worker's measured prefill speed, 0 takes them alike
    measured_speed: float = 0.0
    # leave out workers this request's work would take more than this fraction above the
    # mean recent prefill work; 0 turns the check off
    balance_threshold: float = 0.05
    prefill_load_scale: float = 20.0  # of LoadCostScorer: queued prefill blocks against active KV blocks
    # the balance check keeps a worker over its limit while the tokens it is over stay below
    # this times the extra tokens the request would compute elsewhere (a long cached context)
    balance_move_factor: float = 0.5
    # count a routed prompt's blocks as held by its worker for this many seconds, until the
    # worker's KV events say so (pending_prefixes.py); 0 trusts the events alone
    pending_prefix_s: float = 1.0
    # of LoRAAffinityScorer: a worker lacking the request's adapter is taken to need this
    # many ms to load it, counted against the estimated TTFT; the weight 0 routes adapter-blind.
    # A request naming an adapter counts it as held where it went for pending_prefix_s too.
    lora_affinity: float = 1.0
    lora_load_ms: float = 50.0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PolicyWeights:
        """Weights from a JSON object (--routing-weights); unset keys keep their defaults.
        Raises ValueError naming a key that is unknown or a value that is not a number >= 0."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown weights {unknown}; known: {sorted(known)}")
        for name, value in data.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{name} must be a number, 0 or more; got {value!r}")
        weights = cls(**{k: float(v) for k, v in data.items()})
        weights.scorers()  # checks them
        return weights

    def scorers(self) -> list[tuple[Scorer, float]]:
        candidates: list[tuple[Scorer, float]] = [
            (PrefixOverlapScorer(), self.prefix_overlap),
            (LoadCostScorer(self.prefill_load_scale, self.cache_miss_scale), self.load_cost),
            (QueuedPrefillScorer(), self.queued_prefill),
            (RunningRequestsScorer(), self.running_requests),
            (KVUsageScorer(), self.kv_usage),
            (EstimatedTTFTScorer(self.cache_miss_scale, self.measured_speed > 0), self.estimated_ttft),
            (
                LoRAAffinityScorer(
                    EstimatedTTFTScorer(self.cache_miss_scale, self.measured_speed > 0), self.lora_load_ms
                ),
                self.lora_affinity,
            ),
        ]
        for scorer, weight in candidates:
            if weight < 0:
                raise ValueError(f"the weight of scorer {scorer.name} must be 0 or more, got {weight}")
        return [(scorer, weight) for scorer, weight in candidates if weight > 0]


@dataclass
class RoutingDecision:
    worker: WorkerState
    score: float  # the chosen worker's weighted total
    num_prompt_blocks: int
    overlap_blocks: int  # leading prompt blocks the chosen worker holds
    overlap_tokens: int
    new_prefill_tokens: int  # prompt tokens the chosen worker lacks
    loads_lora: bool = False  # the chosen worker lacks the request's adapter (as far as the router knows)
    # per candidate worker id: each scorer's rating and "total"
    scores: dict[str, dict[str, float]] = field(default_factory=dict)


class RoutingPolicy:
    def __init__(
        self,
        prefix_index: PrefixIndex | None,
        block_size: int,
        weights: PolicyWeights | None = None,
        scorers: Sequence[tuple[Scorer, float]] | None = None,
        picker: MaxScorePicker | None = None,
    ) -> None:
        """`scorers` (scorer, weight) pairs replace the ones `weights` builds."""
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.prefix_index = prefix_index
        self.block_size = block_size
        self.weights = weights if weights is not None else PolicyWeights()
        self.scorers = list(scorers) if scorers is not None else self.weights.scorers()
        self.picker = picker if picker is not None else MaxScorePicker()
        pending_s = self.weights.pending_prefix_s
        self.pending = PendingPrefixes(pending_s) if pending_s > 0 and prefix_index is not None else None
        self.lora_holders = LoRAHolders(pending_s)

    def choose(
        self,
        candidates: Sequence[WorkerState],
        block_hashes: Sequence[int],
        num_prompt_tokens: int,
        lora_name: str | None = None,
    ) -> tuple[WorkerState, RoutingDecision]:
        """The worker to send a prompt of `num_prompt_tokens` tokens to, whose full blocks
        hash to `block_hashes` (router.prefix_index.request_block_hashes, which carry the
        adapter), for the LoRA adapter `lora_name` (None: the base model)."""
        workers = [w for w in candidates if w.healthy]
        if not workers:
            raise NoWorkerAvailable(
                f"none of the {len(candidates)} candidate workers is healthy; "
                "check that the workers are running and reachable from the router"
            )
        overlap = self.prefix_index.match(block_hashes) if self.prefix_index is not None else {}
        now = workers[0].clock()
        if self.pending is not None:
            for worker_id, blocks in self.pending.overlap(block_hashes, now).items():
                overlap[worker_id] = max(overlap.get(worker_id, 0), blocks)
        request = RequestView(num_prompt_tokens, len(block_hashes), self.block_size, overlap, lora_name)
        if lora_name is not None:
            request.lora_holders = self.lora_holders.holders(lora_name, workers, now)
        healthy = workers
        if self.weights.balance_threshold > 0 and len(workers) > 1:
            workers = self._within_balance(workers, request)
        totals, ratings = self._rate(request, workers)
        chosen = self.picker.pick(workers, totals)
        self.picker.note_routed(chosen, request.new_prefill_tokens_of(chosen.worker_id))
        if self.pending is not None:
            self.pending.note_sent(chosen.worker_id, block_hashes, now)
        if lora_name is not None:
            self.lora_holders.note_sent(chosen.worker_id, lora_name, now)

        if len(workers) < len(healthy):  # the report rates every candidate, as if none were left out
            workers = healthy
            totals, ratings = self._rate(request, workers)
        scores = {}
        for i, w in enumerate(workers):
            scores[str(w.worker_id)] = {name: rated[i] for name, rated in ratings.items()}
            scores[str(w.worker_id)]["total"] = totals[i]
        decision = RoutingDecision(
            worker=chosen,
            score=totals[workers.index(chosen)],
            num_prompt_blocks=request.num_prompt_blocks,
            overlap_blocks=request.overlap_of(chosen.worker_id),
            overlap_tokens=request.overlap_tokens_of(chosen.worker_id),
            new_prefill_tokens=request.new_prefill_tokens_of(chosen.worker_id),
            loads_lora=request.lacks_lora(chosen.worker_id),
            scores=scores,
        )
        return chosen, decision

    def _rate(
        self, request: RequestView, workers: list[WorkerState]
    ) -> tuple[list[float], dict[str, list[float]]]:
        """Each worker's weighted total, and each scorer's ratings by scorer name."""
        totals = [0.0] * len(workers)
        ratings: dict[str, list[float]] = {}
        for scorer, weight in self.scorers:
            if request.lora_name is None and isinstance(scorer, LoRAAffinityScorer):
                continue  # a base-model request is rated, and reported, as before adapters
            rated = scorer.score(request, workers)
            ratings[scorer.name] = rated
            totals = [total + weight * r for total, r in zip(totals, rated, strict=True)]
        return totals, ratings

    def _within_balance(self, workers: list[WorkerState], request: RequestView) -> list[WorkerState]:
        """The workers that this request's work would not take more than the threshold
        above the mean of the prefill work sent lately (the picker's decaying count), so a
        hot prefix spreads to a second worker instead of piling its requests on one, which
        an empty queue alone would not show at moderate load. Counting the request's own
        work rather than allowing a whole prompt of slack keeps the margin the same for
        any number of workers (with 16, one long prompt is a large share of a mean).
        Workers at or below the mean always stay, and so does one whose excess is small
        against what moving the request would cost (`balance_move_factor`)."""
        routed = [self.picker.routed_work(w) for w in workers]
        limit = 1 + self.weights.balance_threshold
        total, n = sum(routed), len(workers)
        new = [request.new_prefill_tokens_of(w.worker_id) for w in workers]
        after = [r + c for r, c in zip(routed, new, strict=True)]
        # how far each worker would go over the limit with this request (<= 0: within)
        excess = [a - limit * (total + c) / n for a, c in zip(after, new, strict=True)]
        mean = total / n
        # a worker at or below the mean before this request is never left out (nor is any
        # while nothing has been routed yet)
        within = [e <= 0 or r <= mean for e, r in zip(excess, routed, strict=True)]
        factor = self.weights.balance_move_factor
        if factor > 0 and any(within):
            cheapest = min(c for c, ok in zip(new, within, strict=True) if ok)
            within = [ok or factor * (cheapest - c) > e for c, e, ok in zip(new, excess, within, strict=True)]
        return [w for w, ok in zip(workers, within, strict=True) if ok]
