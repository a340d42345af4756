"""The router's Prometheus metrics.

Two families. Request-level figures measured where the client sees them, under vLLM's
names so existing dashboards work (`vllm:time_to_first_token_seconds`, ...,
`vllm:request_success_total{finished_reason}`), one observation per choice (an n=2
request is two engine requests). And the router's own: where requests went and why
(`pdserve_router_*`), the KV-event streams and the workers' health, read from the
worker pool when scraped.

Each RouterMetrics has its own registry, so several routers (tests) live in one process.
Torch-free.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from common.metrics_buckets import E2E_BUCKETS, ITL_BUCKETS, TTFT_BUCKETS, one_two_five_buckets

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_OVERLAP_BLOCK_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class RouterMetrics:
    def __init__(self, model_name: str, max_model_len: int) -> None:
        disable_created_metrics()  # no *_created series, as vLLM serves them
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        reg, model = self.registry, ["model_name"]
        token_buckets = one_two_five_buckets(max(max_model_len, 1))

        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token, seen at the router.",
                              model, buckets=TTFT_BUCKETS, registry=reg)  # fmt: skip
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between tokens, seen at the router.",
                             model, buckets=ITL_BUCKETS, registry=reg)  # fmt: skip
        self.tpot = Histogram("vllm:request_time_per_output_token_seconds",
                              "Mean time per output token after the first, per request.",
                              model, buckets=ITL_BUCKETS, registry=reg)  # fmt: skip
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Request latency from arrival to last token.",
                             model, buckets=E2E_BUCKETS, registry=reg)  # fmt: skip
        self.prompt_tokens_hist = Histogram("vllm:request_prompt_tokens", "Prompt tokens per request.",
                                            model, buckets=token_buckets, registry=reg)  # fmt: skip
        self.generation_tokens_hist = Histogram("vllm:request_generation_tokens", "Generated tokens per request.",
                                                model, buckets=token_buckets, registry=reg)  # fmt: skip
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Prompt tokens of finished requests.", model, registry=reg
        )
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens of finished requests.",
                                         model, registry=reg)  # fmt: skip
        self.request_success = Counter("vllm:request_success", "Finished requests, by finish reason.",
                                       [*model, "finished_reason"], registry=reg)  # fmt: skip
        self.requests_in_flight = Gauge("pdserve_router_requests_in_flight", "HTTP generation requests in progress.",
                                        model, registry=reg)  # fmt: skip
        self.requests_queued = Gauge("pdserve_router_requests_queued",
                                     "HTTP generation requests waiting for a slot (router/admission.py).",
                                     model, registry=reg)  # fmt: skip
        self.requests_rejected = Counter("pdserve_router_requests_rejected",
                                         "Requests refused before reaching a worker, by reason: no_worker, "
                                         "queue_full, queue_timeout, client_gone (left the queue).",
                                         ["reason"], registry=reg)  # fmt: skip
        self.requests_failed = Counter("pdserve_router_requests_failed",
                                       "Engine requests that ended in an error, by the HTTP status reported.",
                                       ["code"], registry=reg)  # fmt: skip

        self.routed = Counter("pdserve_router_requests_routed", "Engine requests sent to each worker.",
                              ["worker", "role"], registry=reg)  # fmt: skip
        self.overlap_blocks = Histogram("pdserve_router_prefix_overlap_blocks",
                                        "Leading prompt blocks the chosen worker already held, per decision.",
                                        ["role"], buckets=_OVERLAP_BLOCK_BUCKETS, registry=reg)  # fmt: skip
        self.overlap_blocks_by_worker = Counter("pdserve_router_prefix_overlap_blocks_by_worker",
                                                "Cached prompt blocks credited to the worker each request went to.",
                                                ["worker", "role"], registry=reg)  # fmt: skip
        self.prefill_decisions = Counter("pdserve_router_prefill_decisions",
                                         "Where prompts were prefilled: remote (a prefill worker), local (the "
                                         "decode worker, short uncached part or no prefill worker) or "
                                         "fallback (the prefill worker failed, the decode worker recomputed).",
                                         ["decision"], registry=reg)  # fmt: skip
        self.worker_errors = Counter("pdserve_router_worker_errors", "Error messages received from workers.",
                                     ["worker", "code"], registry=reg)  # fmt: skip
        self.health_changes = Counter("pdserve_router_worker_health_changes",
                                      "Workers marked up or down.", ["worker", "role", "state"],
                                      registry=reg)  # fmt: skip

    def add_collector(self, collector: Collector) -> None:
        self.registry.register(collector)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def request_started(self) -> SequenceTimer:
        return SequenceTimer(self)


class SequenceTimer:
    """One engine request's timing as the router sees it, recorded into RouterMetrics."""

    def __init__(self, metrics: RouterMetrics, clock: Callable[[], float] = time.monotonic) -> None:
        self._metrics = metrics
        self._clock = clock
        self.arrival = clock()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None

    def tokens_arrived(self, count: int) -> None:
        if count <= 0:
            return
        now = self._clock()
        labels = self._metrics.model_name
        if self.first_token_at is None:
            self.first_token_at = now
            self._metrics.ttft.labels(labels).observe(now - self.arrival)
        else:
            assert self.last_token_at is not None
            self._metrics.itl.labels(labels).observe(now - self.last_token_at)
        self.last_token_at = now

    def finished(self, finish_reason: str, num_prompt_tokens: int, num_generation_tokens: int) -> None:
        m, labels = self._metrics, self._metrics.model_name
        end = self.last_token_at if self.last_token_at is not None else self._clock()
        m.e2e.labels(labels).observe(end - self.arrival)
        if self.first_token_at is not None and num_generation_tokens > 1:
            m.tpot.labels(labels).observe((end - self.first_token_at) / (num_generation_tokens - 1))
        m.prompt_tokens_hist.labels(labels).observe(num_prompt_tokens)
        m.generation_tokens_hist.labels(labels).observe(num_generation_tokens)
        m.prompt_tokens.labels(labels).inc(num_prompt_tokens)
        m.generation_tokens.labels(labels).inc(num_generation_tokens)
        m.request_success.labels(labels, finish_reason).inc()


class WorkerPoolCollector(Collector):
    """Reads the worker pool at scrape time: health, load and KV-event stream counters."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool

    def collect(self) -> Iterable[Any]:
        healthy = GaugeMetricFamily("pdserve_router_worker_healthy", "1 while the worker sends load reports.",
                                    labels=["worker", "role"])  # fmt: skip
        running = GaugeMetricFamily("pdserve_router_worker_active_requests",
                                    "Requests running or waiting on the worker, as the router counts them.",
                                    labels=["worker", "role"])  # fmt: skip
        kv_usage = GaugeMetricFamily("pdserve_router_worker_kv_cache_usage_perc",
                                     "The worker's KV-cache usage (0-1), as last reported.",
                                     labels=["worker", "role"])  # fmt: skip
        index_blocks = GaugeMetricFamily("pdserve_router_prefix_index_blocks",
                                         "Blocks the prefix index holds for the worker.", labels=["worker"])  # fmt: skip
        # subscriber counter -> (metric name, help)
        stream = {
            "batches_received": (
                "kv_event_batches_received",
                "KV event batches received on the live stream.",
            ),
            "events_indexed": ("kv_events_indexed", "KV events applied to the prefix index."),
            "gaps_detected": ("kv_event_seq_gaps", "Gaps detected in the KV event seq numbers."),
            "replay_requests": ("kv_event_replays", "Replays asked of the worker's replay socket."),
            "replayed_batches": ("kv_event_replayed_batches", "KV event batches recovered by replays."),
            "replay_timeouts": ("kv_event_replay_timeouts", "Replays not answered in time."),
            "lost_batches": ("kv_event_lost_batches", "KV event batches missed and not recovered."),
            "malformed": ("kv_event_malformed", "Malformed KV event messages skipped."),
            "restarts": ("kv_event_stream_restarts", "KV event streams that started over (worker restarts)."),
        }
        families = {
            counter: CounterMetricFamily(f"pdserve_router_{name}", text, labels=["worker"])
            for counter, (name, text) in stream.items()
        }
        for client in self._pool.clients():
            state = client.state
            labels = [state.worker_id, state.role.value]
            healthy.add_metric(labels, 1.0 if state.healthy else 0.0)
            running.add_metric(labels, state.num_active_requests)
            kv_usage.add_metric(labels, state.kv_usage)
            index_blocks.add_metric([state.worker_id], self._pool.prefix_index.num_blocks(state.worker_id))
            counters = self._pool.subscriber.counters(state.worker_id)
            for name, family in families.items():
                family.add_metric([state.worker_id], getattr(counters, name))
        yield from (healthy, running, kv_usage, index_blocks, *families.values())
