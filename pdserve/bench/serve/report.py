"""The printed summary table and the JSON result of a run, laid out as `vllm bench serve`
lays them out (same labels, same JSON keys), so results compare side by side; a run
with structured outputs adds the valid answers and vLLM's structured-output benchmark's
correct_rate(%), and one with --worker-metrics-url the decode workers' KV pulls (a
section of the table, and "kv_pulls" in the JSON). Torch-free.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pdserve.bench.serve.kv_pulls import KVPullFigures
from pdserve.bench.serve.metrics import METRIC_TITLES, BenchmarkMetrics, RequestResult

_WIDTH = 50


@dataclass(frozen=True)
class RunSettings:
    """What a run was asked to do, for the table and the JSON result."""

    backend: str
    model: str
    tokenizer: str
    num_prompts: int
    request_rate: float | str  # "trace": the requests went at the trace's times
    burstiness: float
    max_concurrency: int | None
    percentile_metrics: Sequence[str]
    label: str | None = None


def percentile_name(p: float) -> str:
    """99 → "99", 99.9 → "99.9": as the JSON keys spell percentiles (p99_ttft_ms)."""
    return str(int(p)) if p == int(p) else str(p)


def format_summary(
    metrics: BenchmarkMetrics, settings: RunSettings, kv_pulls: KVPullFigures | None = None
) -> str:
    lines = [" Serving Benchmark Result ".center(_WIDTH, "=")]

    def row(label: str, value: Any) -> None:
        text = f"{value:.2f}" if isinstance(value, float) else str(value)
        lines.append(f"{label:<40} {text:<10}")

    row("Successful requests:", metrics.completed)
    row("Failed requests:", metrics.failed)
    if metrics.structured_outputs is not None:
        row("Structured outputs requested:", metrics.structured_outputs.constrained)
        row("Valid structured outputs:", metrics.structured_outputs.valid)
        row("Correct rate (%):", metrics.structured_outputs.correct_rate)
    if settings.max_concurrency is not None:
        row("Maximum request concurrency:", settings.max_concurrency)
    row("Request rate configured (RPS):", _rate_text(settings.request_rate))
    row("Benchmark duration (s):", metrics.duration)
    row("Total input tokens:", metrics.total_input)
    row("Total generated tokens:", metrics.total_output)
    row("Request throughput (req/s):", metrics.request_throughput)
    if metrics.request_goodput is not None:
        row("Request goodput (req/s):", metrics.request_goodput)
    row("Output token throughput (tok/s):", metrics.output_throughput)
    row("Peak output token throughput (tok/s):", metrics.max_output_tokens_per_s)
    row("Peak concurrent requests:", metrics.max_concurrent_requests)
    row("Total token throughput (tok/s):", metrics.total_token_throughput)
    for name in settings.percentile_metrics:
        title, short = METRIC_TITLES[name]
        dist = metrics.latencies[name]
        lines.append(title.center(_WIDTH, "-"))
        row(f"Mean {short} (ms):", dist.mean)
        row(f"Median {short} (ms):", dist.median)
        row(f"Std {short} (ms):", dist.std)
        for p, value in dist.percentiles:
            row(f"P{percentile_name(p)} {short} (ms):", value)
    if kv_pulls is not None:
        lines.append("KV pulls (decode workers)".center(_WIDTH, "-"))
        row("KV pulls:", kv_pulls.num_pulls)
        row("Failed KV pulls:", kv_pulls.num_failed_pulls)
        if kv_pulls.mean_pull_ms is not None and kv_pulls.mean_pull_bytes is not None:
            row("Mean KV pull, start to usable (ms):", kv_pulls.mean_pull_ms)
            row("Mean KV pull size (MB):", kv_pulls.mean_pull_bytes / 1e6)
            row("KV pull throughput (GB/s):", _or_dash(kv_pulls.pull_gb_per_s))
        row("Connector transfers:", kv_pulls.num_connector_transfers)
        if kv_pulls.mean_connector_xfer_ms is not None:
            row("Mean connector transfer (ms):", kv_pulls.mean_connector_xfer_ms)
            row("Connector throughput (GB/s):", _or_dash(kv_pulls.connector_gb_per_s))
    lines.append("=" * _WIDTH)
    return "\n".join(lines)


def result_json(
    metrics: BenchmarkMetrics,
    settings: RunSettings,
    results: Sequence[RequestResult],
    date: str,
    detailed: bool = False,
    metadata: dict[str, str] | None = None,
    kv_pulls: KVPullFigures | None = None,
) -> dict[str, Any]:
    """The JSON result with vLLM's keys; `detailed` adds every request's lengths and timings,
    `kv_pulls` the decode workers' KV pulls under "kv_pulls"."""
    result: dict[str, Any] = {
        "date": date,
        "endpoint_type": settings.backend,
        "label": settings.label,
        "model_id": settings.model,
        "tokenizer_id": settings.tokenizer,
        "num_prompts": settings.num_prompts,
        **(metadata or {}),
        "request_rate": _rate_text(settings.request_rate),
        "burstiness": settings.burstiness,
        "max_concurrency": settings.max_concurrency,
        "duration": metrics.duration,
        "completed": metrics.completed,
        "failed": metrics.failed,
        "total_input_tokens": metrics.total_input,
        "total_output_tokens": metrics.total_output,
        "request_throughput": metrics.request_throughput,
        "request_goodput": metrics.request_goodput,
        "output_throughput": metrics.output_throughput,
        "total_token_throughput": metrics.total_token_throughput,
        "max_output_tokens_per_s": metrics.max_output_tokens_per_s,
        "max_concurrent_requests": metrics.max_concurrent_requests,
    }
    if metrics.structured_outputs is not None:
        result["num_structured_outputs"] = metrics.structured_outputs.constrained
        result["num_valid_structured_outputs"] = metrics.structured_outputs.valid
        result["correct_rate(%)"] = metrics.structured_outputs.correct_rate
    if kv_pulls is not None:
        result["kv_pulls"] = kv_pulls.to_json()
    for name in settings.percentile_metrics:
        dist = metrics.latencies[name]
        result[f"mean_{name}_ms"] = dist.mean
        result[f"median_{name}_ms"] = dist.median
        result[f"std_{name}_ms"] = dist.std
        for p, value in dist.percentiles:
            result[f"p{percentile_name(p)}_{name}_ms"] = value
    if detailed:
        result["input_lens"] = [r.prompt_len for r in results]
        result["output_lens"] = [r.output_tokens for r in results]
        result["ttfts"] = [r.ttft for r in results]
        result["itls"] = [r.itl for r in results]
        result["start_times"] = [r.start_time for r in results]
        result["latencies"] = [r.latency for r in results]
        result["generated_texts"] = [r.generated_text for r in results]
        result["errors"] = [r.error for r in results]
        if metrics.structured_outputs is not None:
            result["follows_schema"] = [r.follows_schema for r in results]
    return result


def _or_dash(value: float | None) -> float | str:
    return "-" if value is None else value


def _rate_text(rate: float | str) -> float | str:
    return "inf" if isinstance(rate, float) and math.isinf(rate) else rate
