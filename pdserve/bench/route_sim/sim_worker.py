"""A simulated worker: the engine's continuous batching with chunked prefill on a clock,
an LRU prefix cache of fixed size, and what a real worker tells its router (KV events,
load reports, first token, finish).

Each step decodes one token of every running sequence and spends the rest of the token
budget on prompt chunks: first the prompts already started, then new ones from the
waiting queue, first come first served, while the cache has room for their whole
prompt. A prompt's cached leading blocks are looked up when it is admitted (what the
engine's prefix cache would reuse); its other blocks are computed and stored chunk by
chunk. The step's length comes from the ServiceModel; what the step changed is visible
at its end: a prompt that finished in it has its first token then (its TTFT), the KV
events of the blocks it stored and evicted are published then, and a load report goes
out then when the load changed and the last one is 50 ms old (or 1 s, as a heartbeat),
as the real worker's LoadReporter does. A request naming a LoRA adapter the worker's
host cache lacks makes the step that admits it load the adapter first (adapter_cache.py);
load reports list the adapters held.

The worker does not talk to the router itself: `advance(until)` runs the steps that end
by then and leaves their messages in `outbox`, oldest first, for the replay to deliver.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from common.protocol import LoadReport
from common.worker.load_reports import HEARTBEAT_S, MIN_INTERVAL_S
from pdserve.bench.route_sim.adapter_cache import AdapterCache
from pdserve.bench.route_sim.block_cache import LRUBlockCache
from pdserve.bench.route_sim.service_model import ServiceModel, chunk_attention_pairs
from pdserve.bench.route_sim.workloads import lora_of
from pdserve.bench.trace import TRACE_BLOCK_SIZE, TraceRequest


class Message(Enum):
    KV_EVENTS = "kv_events"  # payload: list of KV events of one step
    LOAD_REPORT = "load_report"  # payload: LoadReport
    FIRST_TOKEN = "first_token"  # payload: SimRequest (its prefill is done)
    FINISHED = "finished"  # payload: SimRequest


@dataclass(eq=False)
class SimRequest:
    request_id: str
    trace: TraceRequest
    cached_tokens: int = 0  # prompt tokens the worker's prefix cache had at admission
    computed_tokens: int = 0  # prompt tokens in the KV cache so far, cached ones included
    stored_blocks: int = 0  # leading prompt blocks pinned for it so far
    first_token_s: float = math.nan
    finish_s: float = math.nan

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.trace.arrival_s


@dataclass
class _Step:
    end_s: float
    chunks: list[tuple[SimRequest, int]]  # prompt tokens computed per request
    num_decodes: int


@dataclass(eq=False)
class SimWorker:
    worker_id: str
    capacity_blocks: int
    model: ServiceModel = field(default_factory=ServiceModel)
    block_size: int = TRACE_BLOCK_SIZE
    max_cpu_loras: int = 4  # LoRA adapters it holds in host memory

    def __post_init__(self) -> None:
        self.cache = LRUBlockCache(self.capacity_blocks, self.block_size)
        self.adapters = AdapterCache(self.max_cpu_loras)
        self.waiting: deque[SimRequest] = deque()
        self.prefilling: list[SimRequest] = []  # admitted, prompt not done, admission order
        self.outbox: list[tuple[float, Message, Any]] = []
        self.num_steps = 0
        self.num_requests = 0  # sent here
        self.prompt_tokens = 0  # of every request sent here
        self.cached_tokens = 0  # of those, served from the prefix cache
        self.prefill_tokens = 0  # of those, computed here
        self.busy_s = 0.0  # time spent in steps
        self._step: _Step | None = None
        self._decoding: list[tuple[int, int, SimRequest]] = []  # heap of (last step, seq, request)
        self._num_decode_starts = 0  # orders the heap's ties by start, so runs repeat exactly
        self._decode_context = 0  # tokens the decoding sequences' next step reads
        self._queued_prefill_tokens = 0  # as the engine counts them: waiting prompts whole
        self._last_report_s = -math.inf
        self._last_load: tuple | None = None

    # -- what the replay does ---------------------------------------------------------------

    def submit(self, request: SimRequest, now: float) -> None:
        """`request` arrives at `now` (after `advance(now)`)."""
        blocks = len(request.trace.hash_ids)
        if blocks > self.capacity_blocks:
            raise ValueError(
                f"request {request.request_id} needs {blocks} KV blocks, more than a worker's "
                f"{self.capacity_blocks}; raise --blocks-per-worker to at least {blocks}"
            )
        self.waiting.append(request)
        self.num_requests += 1
        self.prompt_tokens += request.trace.input_length
        self._queued_prefill_tokens += request.trace.input_length
        if self._step is None:
            self._start_step(now)

    def advance(self, until: float) -> None:
        """Run every step that ends by `until`."""
        while self._step is not None and self._step.end_s <= until:
            self._finish_step()

    @property
    def num_running(self) -> int:
        return len(self.prefilling) + len(self._decoding)

    def load(self) -> LoadReport:
        """The load report the worker would send now."""
        return LoadReport(
            num_running=self.num_running,
            num_waiting=len(self.waiting),
            num_queued_prefill_tokens=self._queued_prefill_tokens,
            kv_cache_usage=self.cache.num_in_use / self.capacity_blocks,
            num_kv_blocks=self.capacity_blocks,
            num_prompt_tokens_total=self.prefill_tokens,
            loras=self.adapters.names(),
        )

    # -- the engine step --------------------------------------------------------------------

    def _start_step(self, now: float) -> None:
        num_decodes = len(self._decoding)
        budget = self.model.max_num_batched_tokens - num_decodes
        chunks: list[tuple[SimRequest, int]] = []
        loads = 0  # adapters loaded for the requests this step admits
        for r in self.prefilling:
            if budget <= 0:
                break
            take = min(r.trace.input_length - r.computed_tokens, budget)
            chunks.append((r, take))
            budget -= take
        while self.waiting and budget > 0 and self.num_running < self.model.max_num_seqs:
            r = self.waiting[0]
            if not self._admit(r):
                break  # the queue's head waits for room; later ones wait behind it
            self.waiting.popleft()
            loads += self.adapters.use(lora_of(r.trace))
            take = min(r.trace.input_length - r.computed_tokens, budget)
            chunks.append((r, take))
            budget -= take
        if not chunks and not num_decodes:
            self._step = None
            return
        pairs = 0.0
        for r, take in chunks:
            pairs += chunk_attention_pairs(r.computed_tokens, take)
            self._store_computed(r, r.computed_tokens + take)
        num_tokens = sum(take for _, take in chunks) + num_decodes
        seconds = self.model.step_seconds(num_tokens, pairs, self._decode_context)
        seconds += loads * self.model.lora_load_s
        self.busy_s += seconds
        self._step = _Step(now + seconds, chunks, num_decodes)

    def _admit(self, r: SimRequest) -> bool:
        hashes = r.trace.hash_ids
        hit = self.cache.cached_prefix(hashes)
        if not self.cache.can_admit(hashes, hit):
            return False
        self.cache.use(hashes[:hit])
        self.cache.reserve(len(hashes) - hit)
        # The last prompt token is always computed: its logits give the first output token.
        r.cached_tokens = min(hit * self.block_size, r.trace.input_length - 1)
        r.computed_tokens = r.cached_tokens
        r.stored_blocks = hit
        self.cached_tokens += r.cached_tokens
        self._queued_prefill_tokens -= r.cached_tokens
        self.prefilling.append(r)
        return True

    def _store_computed(self, r: SimRequest, computed: int) -> None:
        # The engine caches a chunk's blocks when it schedules it, as the prefix cache does.
        hashes = r.trace.hash_ids
        full = (
            len(hashes) if computed >= r.trace.input_length else min(computed // self.block_size, len(hashes))
        )
        if full > r.stored_blocks:
            parent = hashes[r.stored_blocks - 1] if r.stored_blocks else None
            self.cache.store(hashes[r.stored_blocks : full], parent)
            r.stored_blocks = full

    def _finish_step(self) -> None:
        step = self._step
        assert step is not None
        now = step.end_s
        self.num_steps += 1
        # the blocks the step stored and evicted when it was scheduled, published as it ends
        events = self.cache.take_events()
        if events:
            self.outbox.append((now, Message.KV_EVENTS, events))
        # every sequence decoding at the step's start made one token
        self._decode_context += step.num_decodes
        while self._decoding and self._decoding[0][0] <= self.num_steps:
            _, _, r = heapq.heappop(self._decoding)
            self._decode_context -= r.trace.input_length + r.trace.output_length
            self._finish(r, now)
        prefilled = False
        for r, take in step.chunks:
            r.computed_tokens += take
            self.prefill_tokens += take
            self._queued_prefill_tokens -= take
            if r.computed_tokens < r.trace.input_length:
                continue
            prefilled = True
            r.first_token_s = now
            self.outbox.append((now, Message.FIRST_TOKEN, r))
            if r.trace.output_length <= 1:
                self._finish(r, now)
            else:
                last_step = self.num_steps + r.trace.output_length - 1
                self._num_decode_starts += 1
                heapq.heappush(self._decoding, (last_step, self._num_decode_starts, r))
                self._decode_context += r.trace.input_length + 1
        if prefilled:
            self.prefilling = [r for r in self.prefilling if r.computed_tokens < r.trace.input_length]
        self._maybe_report(now)
        self._start_step(now)

    def _finish(self, r: SimRequest, now: float) -> None:
        r.finish_s = now
        hashes = r.trace.hash_ids
        self.cache.release(hashes[: r.stored_blocks], unused_reservation=len(hashes) - r.stored_blocks)
        self.outbox.append((now, Message.FINISHED, r))

    def _maybe_report(self, now: float) -> None:
        report = self.load()
        load = (report.num_running, report.num_waiting, round(report.kv_cache_usage, 4),
                report.num_queued_prefill_tokens, frozenset(report.loras))  # fmt: skip
        since = now - self._last_report_s
        if since >= HEARTBEAT_S or (load != self._last_load and since >= MIN_INTERVAL_S):
            self._last_report_s = now
            self._last_load = load
            self.outbox.append((now, Message.LOAD_REPORT, report))
