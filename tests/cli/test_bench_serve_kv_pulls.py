"""`bench serve --worker-metrics-url`: the run's KV pulls from two scrapes of the decode
workers' /metrics (the histograms' _sum and _count, differenced and summed over workers),
the summary section and the JSON key; the metrics texts come from the workers' own
exporter (common/worker/worker_metrics.py), so the names are the ones a worker serves."""

from __future__ import annotations

import argparse
import math

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest, start_http_server

from common.engine.engine_stats import EngineStats
from common.engine.remote_kv_states import LandedPull
from common.kv_connector import TransferRecord
from common.worker.worker_metrics import WorkerMetrics
from pdserve.bench.serve.cli_args import Choices, add_bench_serve_args
from pdserve.bench.serve.kv_pulls import (
    KVPullFigures,
    WorkerMetricsScrape,
    kv_pull_figures,
    metrics_url,
    sample_totals,
)
from pdserve.bench.serve.metrics import RequestResult, compute_metrics
from pdserve.bench.serve.report import RunSettings, format_summary, result_json

BLOCK_BYTES = 1_000_000
IDLE = EngineStats(0, 0, 0.0, 0, 0, 0, 0, 0, 0)


class Worker:
    """A decode worker's metrics as its serving loop fills them."""

    def __init__(self, engine: str) -> None:
        self.metrics = WorkerMetrics(model_name="m", engine=engine, role="decode", max_model_len=1024)

    def pull(self, seconds: float, num_blocks: int, xfer_seconds: float) -> None:
        """One pull that landed: the connector's record and the engine's timing."""
        record = TransferRecord("r", num_blocks * BLOCK_BYTES, xfer_seconds, num_blocks)
        self.metrics.observe_step(IDLE, [record], {})
        self.metrics.observe_kv_pulls([LandedPull("r", seconds, num_blocks)], BLOCK_BYTES)

    def text(self) -> str:
        return generate_latest(self.metrics.registry).decode()


def totals(*workers: Worker) -> dict[str, float]:
    summed: dict[str, float] = {}
    for worker in workers:
        for name, value in sample_totals(worker.text()).items():
            summed[name] = summed.get(name, 0.0) + value
    return summed


def test_the_figures_are_the_pulls_between_the_two_scrapes_over_every_worker():
    a, b = Worker("decode-a"), Worker("decode-b")
    a.pull(seconds=1.0, num_blocks=9, xfer_seconds=0.9)  # before the run: not counted
    before = totals(a, b)
    a.pull(seconds=0.010, num_blocks=2, xfer_seconds=0.006)
    b.pull(seconds=0.030, num_blocks=6, xfer_seconds=0.014)
    figures = kv_pull_figures(before, totals(a, b))
    assert figures.num_pulls == 2 and figures.num_failed_pulls == 0
    assert figures.mean_pull_ms == pytest.approx(20.0)
    assert figures.mean_pull_bytes == pytest.approx(4 * BLOCK_BYTES)
    assert figures.pull_gb_per_s == pytest.approx(8 * BLOCK_BYTES / 0.040 / 1e9)
    assert figures.num_connector_transfers == 2
    assert figures.mean_connector_xfer_ms == pytest.approx(10.0)
    assert figures.connector_gb_per_s == pytest.approx(8 * BLOCK_BYTES / 0.020 / 1e9)


def test_a_run_without_pulls_has_counts_and_no_means():
    worker = Worker("decode")
    worker.pull(seconds=0.5, num_blocks=1, xfer_seconds=0.4)
    snapshot = totals(worker)
    figures = kv_pull_figures(snapshot, snapshot)
    assert figures == KVPullFigures(0, 0, None, None, None, 0, None, None)


def test_failed_pulls_are_the_growth_of_the_workers_load_failures():
    text = '# TYPE pdserve:kv_load_failures counter\npdserve:kv_load_failures_total{engine="e"} {n}\n'
    before = sample_totals(text.replace("{n}", "1.0"))
    after = sample_totals(text.replace("{n}", "4.0"))
    assert kv_pull_figures(before, after).num_failed_pulls == 3


def test_the_summary_and_the_json_carry_the_kv_pull_section():
    done = RequestResult(prompt_len=10, success=True, output_tokens=2, ttft=0.2, itl=[0.1], latency=0.3)
    metrics = compute_metrics([done], 1.0, [99], None)
    settings = RunSettings("openai", "m", "tok", 1, math.inf, 1.0, None, ["ttft"])
    figures = KVPullFigures(3, 1, 12.5, 250e6, 20.0, 3, 8.0, 31.25)
    table = format_summary(metrics, settings, figures)
    assert "KV pulls (decode workers)" in table
    assert "KV pulls:                                3" in table
    assert "Failed KV pulls:                         1" in table
    assert "Mean KV pull, start to usable (ms):      12.50" in table
    assert "Mean KV pull size (MB):                  250.00" in table
    assert "KV pull throughput (GB/s):               20.00" in table
    assert "Mean connector transfer (ms):            8.00" in table
    assert "Connector throughput (GB/s):             31.25" in table
    document = result_json(metrics, settings, [], "20250101-000000", kv_pulls=figures)
    assert document["kv_pulls"] == {
        "num_pulls": 3, "num_failed_pulls": 1, "mean_pull_ms": 12.5, "mean_pull_bytes": 250e6,
        "pull_gb_per_s": 20.0, "num_connector_transfers": 3, "mean_connector_xfer_ms": 8.0,
        "connector_gb_per_s": 31.25,
    }  # fmt: skip
    assert "KV pull" not in format_summary(metrics, settings) and "kv_pulls" not in result_json(
        metrics, settings, [], "20250101-000000"
    )
    empty = format_summary(metrics, settings, KVPullFigures(0, 0, None, None, None, 0, None, None))
    assert "KV pulls:                                0" in empty and "Mean KV pull" not in empty


def test_a_worker_url_is_scraped_at_its_metrics_path():
    assert metrics_url("http://127.0.0.1:9100") == "http://127.0.0.1:9100/metrics"
    assert metrics_url("http://127.0.0.1:9100/") == "http://127.0.0.1:9100/metrics"
    assert metrics_url("http://h:1/metrics") == "http://h:1/metrics"
    with pytest.raises(ValueError, match="metrics on port"):
        metrics_url("127.0.0.1:9100")


def test_the_option_repeats_and_is_checked_before_the_server_is_reached():
    parser = argparse.ArgumentParser()
    add_bench_serve_args(parser)
    args = parser.parse_args(["--worker-metrics-url", "http://a:1", "--worker-metrics-url", "http://b:2/"])
    assert Choices.of(args).worker_metrics_urls == ["http://a:1/metrics", "http://b:2/metrics"]
    args = parser.parse_args(["--worker-metrics-url", "a:1"])
    with pytest.raises(ValueError, match="--worker-metrics-url 'a:1'"):
        Choices.of(args)


def test_a_live_worker_endpoint_is_read_and_one_without_the_histogram_is_refused():
    worker = Worker("decode")
    port = worker.metrics.serve_http("127.0.0.1", 0)
    other = CollectorRegistry()
    Counter("http_requests", "Some other server's metrics.", registry=other).inc()
    server, thread = start_http_server(0, addr="127.0.0.1", registry=other)
    try:
        scrape = WorkerMetricsScrape([f"http://127.0.0.1:{port}"])
        before = scrape.snapshot()
        worker.pull(seconds=0.004, num_blocks=3, xfer_seconds=0.002)
        assert kv_pull_figures(before, scrape.snapshot()).mean_pull_bytes == 3 * BLOCK_BYTES
        with pytest.raises(RuntimeError, match="exports no pdserve:kv_pull_seconds"):
            WorkerMetricsScrape([f"http://127.0.0.1:{server.server_port}"]).snapshot()
    finally:
        worker.metrics.close()
        server.shutdown()
        server.server_close()
