"""`pdserve bench serve`'s arithmetic on synthetic timings: TTFT, TPOT, ITL, E2EL
distributions, throughput, goodput under SLOs, peaks; request arrival times; the
summary table and the JSON result's keys."""

from __future__ import annotations

import math
import statistics

import pytest

from pdserve.bench.serve.arrivals import send_times
from pdserve.bench.serve.cli_args import parse_request_rates, resolve_backend
from pdserve.bench.serve.datasets import SampleRequest
from pdserve.bench.serve.metrics import (
    RequestResult,
    compute_metrics,
    parse_goodput,
    peak_concurrency,
    peak_output_tokens_per_s,
)
from pdserve.bench.serve.report import RunSettings, format_summary, result_json
from pdserve.bench.stats import percentile
from tests.harness.torch_free import assert_imports_without_torch


def _ok(start: float, ttft: float, itl: list[float], prompt_len: int = 10) -> RequestResult:
    return RequestResult(
        prompt_len=prompt_len,
        success=True,
        output_tokens=len(itl) + 1,
        ttft=ttft,
        itl=list(itl),
        latency=ttft + sum(itl),
        start_time=start,
    )


def _failed(start: float, latency: float) -> RequestResult:
    return RequestResult(prompt_len=10, error="HTTP 400: too long", latency=latency, start_time=start)


def test_tpot_is_the_time_after_the_first_token_per_later_token():
    result = _ok(0.0, ttft=0.5, itl=[0.1, 0.2, 0.3])
    assert result.tpot == pytest.approx((1.1 - 0.5) / 3)
    assert _ok(0.0, ttft=0.5, itl=[]).tpot is None  # one token: no TPOT


def test_percentile_interpolates_between_ranks_like_numpy():
    values = [1.0, 2.0, 3.0, 4.0]
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 99) == pytest.approx(3.97)
    assert percentile(values, 100) == 4.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 99) == 0.0


def test_metrics_count_only_successful_requests_and_report_milliseconds():
    results = [
        _ok(0.0, ttft=0.2, itl=[0.1, 0.1], prompt_len=10),
        _ok(0.5, ttft=0.4, itl=[0.3], prompt_len=20),
        _ok(1.0, ttft=0.6, itl=[], prompt_len=30),
        _failed(1.0, 0.05),
    ]
    metrics = compute_metrics(results, duration=2.0, percentiles=[50, 99])
    assert (metrics.completed, metrics.failed) == (3, 1)
    assert metrics.total_input == 60 and metrics.total_output == 3 + 2 + 1
    assert metrics.request_throughput == pytest.approx(1.5)
    assert metrics.output_throughput == pytest.approx(3.0)
    assert metrics.total_token_throughput == pytest.approx(33.0)
    assert metrics.request_goodput is None
    ttft = metrics.latencies["ttft"]
    assert ttft.mean == pytest.approx(400.0) and ttft.median == pytest.approx(400.0)
    assert ttft.std == pytest.approx(statistics.pstdev([200.0, 400.0, 600.0]))
    assert dict(ttft.percentiles)[99] == pytest.approx(596.0)
    # TPOT only for outputs of more than one token: 100 ms and 300 ms
    assert metrics.latencies["tpot"].mean == pytest.approx(200.0)
    # ITL: every gap of every request
    assert metrics.latencies["itl"].median == pytest.approx(100.0)
    assert metrics.latencies["itl"].mean == pytest.approx(500.0 / 3)
    assert metrics.latencies["e2el"].mean == pytest.approx((400.0 + 700.0 + 600.0) / 3)


def test_goodput_counts_requests_meeting_every_slo_per_second():
    results = [
        _ok(0.0, ttft=0.1, itl=[0.05] * 4),  # meets both
        _ok(0.0, ttft=0.3, itl=[0.05] * 4),  # TTFT over 200 ms
        _ok(0.0, ttft=0.1, itl=[0.2] * 4),  # TPOT over 100 ms
        _ok(0.0, ttft=0.1, itl=[]),  # one token: TPOT counts as 0
        _failed(0.0, 0.01),  # never good
    ]
    metrics = compute_metrics(results, duration=2.0, goodput_slos=parse_goodput(["ttft:200", "tpot:100"]))
    assert metrics.request_goodput == pytest.approx(2 / 2.0)
    e2el_only = compute_metrics(results, duration=1.0, goodput_slos={"e2el": 350.0})
    assert e2el_only.request_goodput == pytest.approx(2.0)  # latencies 0.3, 0.5, 0.9, 0.1 s


@pytest.mark.parametrize("bad", ["ttft", "speed:5", "ttft:fast", "tpot:-1"])
def test_a_malformed_goodput_slo_is_refused_with_the_expected_form(bad):
    with pytest.raises(ValueError, match="--goodput"):
        parse_goodput([bad])


def test_peak_output_tokens_per_second_counts_tokens_in_whole_second_buckets():
    # request A: tokens at 0.5, 0.6, 0.7; request B: at 0.9 and 1.5; C at 2.2
    results = [
        _ok(0.0, ttft=0.5, itl=[0.1, 0.1]),
        _ok(0.4, ttft=0.5, itl=[0.6]),
        _ok(2.0, ttft=0.2, itl=[]),
    ]
    assert peak_output_tokens_per_s(results) == 4.0
    assert peak_output_tokens_per_s([_failed(0.0, 1.0)]) == 0.0


def test_peak_concurrency_is_the_most_requests_in_flight_at_once():
    results = [
        _ok(0.0, ttft=1.0, itl=[]),  # 0 to 1
        _ok(0.5, ttft=1.0, itl=[]),  # 0.5 to 1.5
        _ok(1.0, ttft=0.2, itl=[]),  # starts as the first ends
        _failed(1.1, 0.1),  # 1.1 to 1.2: in flight too
    ]
    assert peak_concurrency(results) == 3
    assert peak_concurrency([]) == 0


def test_send_times_all_at_once_at_an_infinite_rate():
    requests = [SampleRequest("p", 1, 1)] * 5
    assert send_times(requests, math.inf) == [0.0] * 5


def test_send_times_have_the_asked_mean_gap_and_burstiness_sets_their_spread():
    requests = [SampleRequest("p", 1, 1)] * 4001
    poisson = send_times(requests, request_rate=4.0, burstiness=1.0, seed=1)
    gaps = [b - a for a, b in zip(poisson, poisson[1:], strict=False)]
    assert poisson[0] == 0.0 and all(g >= 0 for g in gaps)
    assert statistics.fmean(gaps) == pytest.approx(0.25, rel=0.1)
    # gamma of shape k: coefficient of variation 1/sqrt(k)
    assert statistics.pstdev(gaps) / statistics.fmean(gaps) == pytest.approx(1.0, rel=0.1)
    bursty = send_times(requests, request_rate=4.0, burstiness=0.25, seed=1)
    bursty_gaps = [b - a for a, b in zip(bursty, bursty[1:], strict=False)]
    assert statistics.fmean(bursty_gaps) == pytest.approx(0.25, rel=0.15)
    assert statistics.pstdev(bursty_gaps) / statistics.fmean(bursty_gaps) == pytest.approx(2.0, rel=0.15)
    assert send_times(requests[:10], 4.0, 1.0, seed=7) == send_times(requests[:10], 4.0, 1.0, seed=7)


def test_a_trace_keeps_its_own_send_times_whatever_the_rate():
    requests = [SampleRequest("p", 1, 1, 0.0), SampleRequest("p", 1, 1, 1.5), SampleRequest("p", 1, 1, 4.0)]
    assert send_times(requests, math.inf) == [0.0, 1.5, 4.0]


@pytest.mark.parametrize("rate, burstiness", [(0.0, 1.0), (-1.0, 1.0), (1.0, 0.0)])
def test_a_rate_or_burstiness_that_is_not_positive_is_refused(rate, burstiness):
    with pytest.raises(ValueError):
        send_times([SampleRequest("p", 1, 1)], rate, burstiness)


def test_request_rates_parse_as_a_comma_separated_list_with_inf():
    assert parse_request_rates("1,2.5, inf") == [1.0, 2.5, math.inf]
    for bad in ("fast", "0", "1,-2"):
        with pytest.raises(ValueError, match="--request-rate"):
            parse_request_rates(bad)


def test_backend_and_endpoint_default_from_each_other():
    assert resolve_backend(None, None) == ("openai", "/v1/completions")
    assert resolve_backend("openai-chat", None) == ("openai-chat", "/v1/chat/completions")
    assert resolve_backend(None, "/v1/chat/completions") == ("openai-chat", "/v1/chat/completions")
    assert resolve_backend("vllm", "/v1/completions") == ("vllm", "/v1/completions")
    with pytest.raises(ValueError, match="does not match"):
        resolve_backend("openai-chat", "/v1/completions")


def test_summary_table_and_json_use_vllms_labels_and_keys():
    results = [_ok(0.0, ttft=0.2, itl=[0.1, 0.1]), _failed(0.0, 0.1)]
    metrics = compute_metrics(results, 1.0, [50, 99.9], {"ttft": 500.0})
    settings = RunSettings("openai", "m", "tok", 2, math.inf, 1.0, 4, ["ttft", "itl"])
    table = format_summary(metrics, settings)
    assert "Successful requests:                     1" in table
    assert "Failed requests:                         1" in table
    assert "Maximum request concurrency:             4" in table
    assert "Request rate configured (RPS):           inf" in table
    assert "Request goodput (req/s):                 1.00" in table
    assert "P99.9 TTFT (ms):" in table and "Median ITL (ms):                         100.00" in table
    assert "TPOT" not in table  # only the metrics asked for
    document = result_json(
        metrics, settings, results, "20250101-000000", detailed=True, metadata={"device": "cpu"}
    )
    assert document["request_rate"] == "inf" and document["device"] == "cpu"
    assert document["completed"] == 1 and document["failed"] == 1
    assert document["p99.9_ttft_ms"] == pytest.approx(200.0)
    assert document["median_itl_ms"] == pytest.approx(100.0)
    assert document["itls"] == [[0.1, 0.1], []] and document["errors"] == ["", "HTTP 400: too long"]
    assert "mean_tpot_ms" not in document


def test_the_bench_serve_package_never_imports_torch():
    assert_imports_without_torch(
        *(f"pdserve.bench.serve.{name}" for name in ("command", "cli_args", "plots"))
    )
