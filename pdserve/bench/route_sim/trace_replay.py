"""Replay a trace through the router's real routing policy and prefix index against
simulated workers, and measure what routing quality means to users: cache hit rate,
load balance, time to first token.

For each request, in arrival order: every worker runs its steps up to the arrival time,
and what they said meanwhile reaches the router as it would over the wire (KV events
msgpack-encoded and decoded into the PrefixIndex, load reports into the WorkerState,
first tokens and finishes as the orchestrator notes them); then the RoutingPolicy picks
a worker (for the request's LoRA adapter, if it names one), the router notes the request there as the orchestrator does, and the worker
queues it. The router only knows what the workers have published: a prompt being
prefilled somewhere is not in the index until its blocks are.

KV events and load reports reach the router `event_delay_s` after the worker sent them
(the publisher's batching, the network and the subscriber's queue: tens of ms in a real
cluster), so the router routes on a slightly old view, as a real one does. First tokens
and finishes come on the request's own stream, which the router reads as it arrives.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from common.kv_events import KVEventBatch, decode_batch, encode_batch
from common.protocol import WorkerRole
from pdserve.bench.route_sim.bounds import oracle_misses
from pdserve.bench.route_sim.service_model import ServiceModel
from pdserve.bench.route_sim.sim_worker import Message, SimRequest, SimWorker
from pdserve.bench.route_sim.workloads import lora_of
from pdserve.bench.stats import percentile
from pdserve.bench.trace import TRACE_BLOCK_SIZE, TraceRequest, distinct_blocks
from router.policy import PolicyWeights
from router.policy.named import build_policy
from router.prefix_index import PrefixIndex
from router.worker_state import WorkerState


@dataclass
class RouteResult:
    policy: str
    num_requests: int
    num_workers: int
    blocks_per_worker: int
    hit_rate: float  # prompt tokens served from the workers' caches / prompt tokens
    oracle_hit_rate: float  # the same with one worker of unbounded cache
    load_imbalance: float  # max / mean of per-worker prefill (computed prompt) tokens
    ttft_p50_ms: float
    ttft_p99_ms: float
    ttft_p999_ms: float
    ttft_mean_ms: float
    decisions_per_s: float  # RoutingPolicy.choose calls per second of their own time
    kv_events_per_s: float  # KV events decoded and indexed per second of that work
    kv_events: int
    kv_event_blocks: int  # block hashes those events carried
    evicted_blocks: int
    index_hit_rate: float  # what the router's index promised on the chosen worker
    simulated_s: float  # from the first arrival to the last finish
    busy_fraction: float  # of the workers' time over the trace's span, spent in steps (mean)
    max_busy_fraction: float  # the same for the busiest worker
    wall_s: float
    prefill_tokens_per_worker: list[int] = field(default_factory=list)
    lora_requests: int = 0  # requests that named a LoRA adapter
    lora_loads: int = 0  # adapter loads the workers made for them (host cache misses)

    def to_json(self) -> dict:
        return {k: _json_number(v) for k, v in vars(self).items()}


def default_blocks_per_worker(trace: Sequence[TraceRequest]) -> int:
    """A tenth of the trace's distinct blocks, but at least its largest prompt."""
    largest = max((len(r.hash_ids) for r in trace), default=1)
    return max(distinct_blocks(list(trace)) // 10, largest, 1)


def oracle_hit_rate(trace: Sequence[TraceRequest], block_size: int = TRACE_BLOCK_SIZE) -> float:
    """The hit rate of one worker that never evicts and sees every earlier prompt's blocks
    at once: the most any routing can reach."""
    total = sum(r.input_length for r in trace)
    return (total - sum(oracle_misses(trace, block_size))) / total if total else 0.0


class TraceReplay:
    """One replay: the router's side (PrefixIndex, RoutingPolicy, a WorkerState per
    worker) and the simulated workers, kept after `run` for inspection."""

    def __init__(
        self,
        trace: Sequence[TraceRequest],
        policy_name: str,
        num_workers: int = 8,
        blocks_per_worker: int | None = None,
        model: ServiceModel | None = None,
        weights: PolicyWeights | None = None,
        event_delay_s: float = 0.0,
        max_cpu_loras: int = 4,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"--num-workers must be at least 1, got {num_workers}")
        if not event_delay_s >= 0:
            raise ValueError(f"--event-delay-ms must be 0 or more, got {event_delay_s * 1000}")
        self.event_delay_s = event_delay_s
        self.trace = list(trace)
        self.policy_name = policy_name
        self.model = model or ServiceModel()
        self.model.validate()
        self.capacity = (
            blocks_per_worker if blocks_per_worker is not None else default_blocks_per_worker(trace)
        )
        self.index = PrefixIndex()
        self.policy = build_policy(policy_name, self.index, TRACE_BLOCK_SIZE, weights)
        self.now = 0.0
        self.states = [
            WorkerState(f"w{i}", WorkerRole.DECODE, f"sim://w{i}", clock=self._clock)
            for i in range(num_workers)
        ]
        self.workers = {
            s.worker_id: SimWorker(s.worker_id, self.capacity, self.model, max_cpu_loras=max_cpu_loras)
            for s in self.states
        }
        self.requests: list[SimRequest] = []
        self.num_kv_events = 0
        self.num_kv_event_blocks = 0
        self._decide_s = self._index_s = 0.0
        self._promised_tokens = 0  # cached tokens the index showed on the chosen workers
        # per worker, what it said and the router has not heard yet: (due time, order, kind, payload)
        self._in_flight: dict[str, list[tuple[float, int, Message, object]]] = {
            s.worker_id: [] for s in self.states
        }
        self._order = itertools.count()

    def _clock(self) -> float:
        return self.now

    def run(self, oracle: float | None = None) -> RouteResult:
        start = time.perf_counter()
        for n, tr in enumerate(self.trace):
            self.now = tr.arrival_s
            self._catch_up(self.now)
            t0 = time.perf_counter()
            state, decision = self.policy.choose(self.states, tr.hash_ids, tr.input_length, lora_of(tr))
            self._decide_s += time.perf_counter() - t0
            request = SimRequest(str(n), tr)
            # as the orchestrator notes a request sent to a decode worker that prefills it
            blocks = math.ceil((tr.input_length + tr.output_length) / TRACE_BLOCK_SIZE)
            state.note_request_sent(request.request_id, decision.new_prefill_tokens, blocks)
            self._promised_tokens += min(decision.overlap_tokens, tr.input_length - 1)
            self.workers[state.worker_id].submit(request, self.now)
            self.requests.append(request)
        self._catch_up(math.inf)
        return self._result(time.perf_counter() - start, oracle)

    def _catch_up(self, until: float) -> None:
        """Run every worker's steps that end by `until` and deliver what they said that
        has reached the router by then."""
        for state in self.states:
            worker = self.workers[state.worker_id]
            worker.advance(until)
            in_flight = self._in_flight[state.worker_id]
            for ts, kind, payload in worker.outbox:
                delayed = kind is Message.KV_EVENTS or kind is Message.LOAD_REPORT
                due = ts + self.event_delay_s if delayed else ts
                heapq.heappush(in_flight, (due, next(self._order), kind, payload))
            worker.outbox.clear()
            if in_flight and in_flight[0][0] <= until:
                self._deliver(state, in_flight, until)

    def _deliver(self, state: WorkerState, in_flight: list, until: float) -> None:
        # each message is taken at the time it reaches the router, which times what it says
        # (the age of a load report, the speed measured between two)
        now = self.now
        while in_flight and in_flight[0][0] <= until:
            due, _, kind, payload = heapq.heappop(in_flight)
            self.now = due
            if kind is Message.KV_EVENTS:
                wire = encode_batch(KVEventBatch(ts=due - self.event_delay_s, events=payload))
                t0 = time.perf_counter()
                self.index.apply_batch(state.worker_id, decode_batch(wire))
                self._index_s += time.perf_counter() - t0
                self.num_kv_events += len(payload)
                self.num_kv_event_blocks += sum(len(e.block_hashes) for e in payload)
            elif kind is Message.LOAD_REPORT:
                state.update_load(payload)
            elif kind is Message.FIRST_TOKEN:
                state.note_prefill_done(payload.request_id)
            else:
                state.note_request_finished(payload.request_id)
        self.now = now

    def _result(self, wall_s: float, oracle: float | None) -> RouteResult:
        workers = [self.workers[s.worker_id] for s in self.states]
        prompt_tokens = sum(w.prompt_tokens for w in workers)
        per_worker = [w.prefill_tokens for w in workers]
        mean_prefill = sum(per_worker) / len(workers)
        ttfts = sorted(r.ttft_s for r in self.requests)
        first = self.trace[0].arrival_s if self.trace else 0.0
        span = max((r.finish_s for r in self.requests), default=first) - first
        busy = [w.busy_s for w in workers]
        return RouteResult(
            policy=self.policy_name,
            num_requests=len(self.requests),
            num_workers=len(workers),
            blocks_per_worker=self.capacity,
            hit_rate=sum(w.cached_tokens for w in workers) / prompt_tokens if prompt_tokens else 0.0,
            oracle_hit_rate=oracle if oracle is not None else oracle_hit_rate(self.trace),
            load_imbalance=max(per_worker) / mean_prefill if mean_prefill else 1.0,
            ttft_p50_ms=1000 * percentile(ttfts, 50, empty=math.nan),
            ttft_p99_ms=1000 * percentile(ttfts, 99, empty=math.nan),
            ttft_p999_ms=1000 * percentile(ttfts, 99.9, empty=math.nan),
            ttft_mean_ms=1000 * sum(ttfts) / len(ttfts) if ttfts else math.nan,
            decisions_per_s=len(self.requests) / self._decide_s if self._decide_s else math.inf,
            kv_events_per_s=self.num_kv_events / self._index_s if self._index_s else math.inf,
            kv_events=self.num_kv_events,
            kv_event_blocks=self.num_kv_event_blocks,
            evicted_blocks=sum(w.cache.num_evicted for w in workers),
            index_hit_rate=self._promised_tokens / prompt_tokens if prompt_tokens else 0.0,
            busy_fraction=sum(busy) / len(busy) / span if span > 0 else 0.0,
            max_busy_fraction=max(busy) / span if span > 0 else 0.0,
            simulated_s=span,
            wall_s=wall_s,
            prefill_tokens_per_worker=per_worker,
            lora_requests=sum(1 for r in self.trace if lora_of(r) is not None),
            lora_loads=sum(w.adapters.num_loads for w in workers),
        )


def replay(
    trace: Sequence[TraceRequest],
    policy_name: str,
    num_workers: int = 8,
    blocks_per_worker: int | None = None,
    model: ServiceModel | None = None,
    weights: PolicyWeights | None = None,
    oracle: float | None = None,
    event_delay_s: float = 0.0,
    max_cpu_loras: int = 4,
) -> RouteResult:
    """Route every request of `trace` with the policy `policy_name` (router.policy.named);
    `oracle` saves recomputing oracle_hit_rate(trace) when comparing several policies."""
    run = TraceReplay(
        trace, policy_name, num_workers, blocks_per_worker, model, weights, event_delay_s, max_cpu_loras
    )
    return run.run(oracle)


def _json_number(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, float):
        return round(value, 6)
    return value
