"""A worker's Prometheus metrics, named as vLLM's (specs/metrics-and-bench.md), so existing
dashboards read a pdserve worker as they read a vLLM engine.

The serving loop calls `observe_step()` after each turn with the engine's counters (the
gauges are set, the counters grow by the difference) and the connector's finished
transfers, and `observe_finished()` for each request that leaves. Per-request latencies
(TTFT, ITL, TPOT, end-to-end) are measured here in the worker, from the moment the
request arrived on its socket. On a decode worker that pulled the prompt's KV, the
first token it sends is the request's second, so its TTFT is the time to that token.

The KV-transfer histograms keep vLLM's `nixl_` names whichever connector moved the
bytes; they time a pull as its connector sees it, from the start of the data movement
(after the handshake) to the connector's record of its end. pdserve's own additions are
under `pdserve:`, among them a pull as the decode worker sees it (pdserve:kv_pull_seconds
and pdserve:kv_pull_bytes): from the engine handing it to the connector until the engine
has taken the landed pull in and its request can be scheduled, the hand-off to the
connector's I/O thread, the handshake and the worker loop's poll included.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)

from common.metrics_buckets import E2E_BUCKETS, ITL_BUCKETS, TTFT_BUCKETS, one_two_five_buckets

if TYPE_CHECKING:  # the engine's types (torch) stay out of the metrics' imports
    from common.engine.remote_kv_states import LandedPull

# seconds one KV pull takes (vllm:nixl_xfer_time_seconds, pdserve:kv_pull_seconds)
XFER_TIME_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
# bytes one KV pull moves, 1 KiB to 16 GiB by fours (vllm:nixl_bytes_transferred, pdserve:kv_pull_bytes)
XFER_BYTES_BUCKETS = tuple(float(4**k * 1024) for k in range(13))
FINISHED_REASONS = ("stop", "length", "abort")


class WorkerMetrics:
    def __init__(self, *, model_name: str, engine: str, role: str, max_model_len: int) -> None:
        disable_created_metrics()  # the *_created series only add noise to a scrape
        self.registry = CollectorRegistry(auto_describe=True)
        labels = {"model_name": model_name, "engine": engine, "role": role}
        names = tuple(labels)
        reg = self.registry

        def gauge(name: str, doc: str) -> Any:
            return Gauge(name, doc, names, registry=reg).labels(**labels)

        def counter(name: str, doc: str) -> Any:
            return Counter(name, doc, names, registry=reg).labels(**labels)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Any:
            return Histogram(name, doc, names, buckets=buckets, registry=reg).labels(**labels)

        self.num_requests_running = gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches."
        )
        self.num_requests_waiting = gauge(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed (including remote-KV pulls).",
        )
        self.kv_cache_usage = gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Number of generation tokens processed.")
        self.prefix_cache_queries = counter(
            "vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens."
        )
        self.prefix_cache_hits = counter(
            "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."
        )
        self.num_preemptions = counter(
            "vllm:num_preemptions", "Cumulative number of preemptions from the engine."
        )
        success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            (*names, "finished_reason"),
            registry=reg,
        )
        self._success = {
            reason: success.labels(**labels, finished_reason=reason) for reason in FINISHED_REASONS
        }
        self.ttft = histogram(
            "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS
        )
        self.itl = histogram(
            "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", ITL_BUCKETS
        )
        self.tpot = histogram(
            "vllm:request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.",
            ITL_BUCKETS,
        )
        self.e2e = histogram(
            "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", E2E_BUCKETS
        )
        token_buckets = one_two_five_buckets(max_model_len)
        self.request_prompt_tokens = histogram(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.", token_buckets
        )
        self.request_generation_tokens = histogram(
            "vllm:request_generation_tokens", "Number of generation tokens processed.", token_buckets
        )
        self.xfer_time = histogram(
            "vllm:nixl_xfer_time_seconds",
            "Histogram of transfer duration for KV cache pulls.",
            XFER_TIME_BUCKETS,
        )
        self.xfer_bytes = histogram(
            "vllm:nixl_bytes_transferred",
            "Histogram of bytes transferred per KV cache pull.",
            XFER_BYTES_BUCKETS,
        )
        self.xfer_descriptors = histogram(
            "vllm:nixl_num_descriptors",
            "Histogram of number of descriptors (blocks) per KV cache pull.",
            one_two_five_buckets(1 << 20),
        )
        self.xfer_failed = counter("vllm:nixl_num_failed_transfers", "Number of failed KV cache pulls.")
        self.kv_pull_time = histogram(
            "pdserve:kv_pull_seconds",
            "Seconds from handing a KV pull to the connector until its blocks are usable and the "
            "request can be scheduled (the whole path the decode worker waits on).",
            XFER_TIME_BUCKETS,
        )
        self.kv_pull_bytes = histogram(
            "pdserve:kv_pull_bytes",
            "KV bytes of the blocks each pull timed by pdserve:kv_pull_seconds brought in.",
            XFER_BYTES_BUCKETS,
        )
        self.held_requests = gauge(
            "pdserve:kv_held_requests", "Requests whose KV blocks are held for a decode worker to pull."
        )
        self.exported = counter(
            "pdserve:kv_exported_requests", "Requests whose KV blocks were exported to a consumer."
        )
        self.freed_expired = counter(
            "pdserve:kv_lease_expired_requests", "Exported requests freed because their lease ran out."
        )
        self.kv_load_failures = counter(
            "pdserve:kv_load_failures",
            "KV pulls that failed (then recomputed or failed by kv_load_failure_policy).",
        )
        self._last: dict[str, float] = {}
        self._server: Any = None
        self._server_thread: threading.Thread | None = None

    # -- what the serving loop reports ------------------------------------------------------

    def observe_step(
        self, stats: Any, transfer_records: list[Any], connector_stats: dict[str, float]
    ) -> None:
        """Gauges from EngineStats, counters by their growth since the last call."""
        self.num_requests_running.set(stats.num_running)
        self.num_requests_waiting.set(stats.num_waiting + stats.num_waiting_for_remote_kv)
        self.kv_cache_usage.set(stats.kv_cache_usage)
        self.held_requests.set(stats.num_held_requests)
        self._grow(self.prompt_tokens, "prompt", stats.num_prompt_tokens)
        self._grow(self.generation_tokens, "generation", stats.num_generation_tokens)
        self._grow(self.prefix_cache_queries, "queries", stats.prefix_cache_queries)
        self._grow(self.prefix_cache_hits, "hits", stats.prefix_cache_hits)
        self._grow(self.num_preemptions, "preemptions", stats.num_preemptions)
        self._grow(self.kv_load_failures, "kv_load_failures", stats.num_kv_load_failures)
        self._grow(self.xfer_failed, "failed_transfers", connector_stats.get("num_failed_transfers", 0))
        self._grow(self.exported, "exported", connector_stats.get("num_exported", 0))
        self._grow(self.freed_expired, "expired", connector_stats.get("num_freed_expired", 0))
        for record in transfer_records:
            self.xfer_time.observe(record.seconds)
            self.xfer_bytes.observe(record.num_bytes)
            self.xfer_descriptors.observe(record.num_descriptors)

    def observe_kv_pulls(self, pulls: Sequence[LandedPull], block_bytes: int) -> None:
        """Pulls whose blocks became usable, each of their blocks `block_bytes` of KV."""
        for pull in pulls:
            self.kv_pull_time.observe(pull.seconds)
            self.kv_pull_bytes.observe(pull.num_blocks * block_bytes)

    def observe_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def observe_inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def observe_finished(
        self,
        *,
        finish_reason: str | None,
        e2e_seconds: float,
        num_prompt_tokens: int,
        num_generation_tokens: int,
        decode_seconds: float | None,
    ) -> None:
        """A request left the worker. finish_reason None: a prefill_only request handed to
        its consumer (counted in pdserve:kv_exported_requests, not as a success)."""
        self.e2e.observe(e2e_seconds)
        self.request_prompt_tokens.observe(num_prompt_tokens)
        self.request_generation_tokens.observe(num_generation_tokens)
        if finish_reason in self._success:
            self._success[finish_reason].inc()
        if decode_seconds is not None and num_generation_tokens > 1:
            self.tpot.observe(decode_seconds / (num_generation_tokens - 1))

    def _grow(self, counter: Any, key: str, value: float) -> None:
        delta = value - self._last.get(key, 0)
        if delta > 0:
            counter.inc(delta)
        self._last[key] = value

    # -- the HTTP endpoint -------------------------------------------------------------------

    def serve_http(self, host: str, port: int) -> int:
        """Serve /metrics on host:port (0: a free port) from a thread; the port bound."""
        self._server, self._server_thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
