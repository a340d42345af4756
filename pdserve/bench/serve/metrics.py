"""The figures of a serving benchmark, from each request's timings, as `vllm bench serve`
computes them. Pure arithmetic on plain data: no clock, no network. Torch-free.

TTFT = first streamed token − request start; ITL = each gap between streamed chunks;
TPOT = (latency − TTFT) / (output tokens − 1), only for outputs of more than one token;
E2EL = the request's latency. A request is good (goodput) when every SLO given holds;
an output of one token counts as TPOT 0 there. With structured outputs, the share of
constrained answers that followed their schema is vLLM's correct rate.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pdserve.bench.stats import percentile

LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
METRIC_TITLES = {
    "ttft": ("Time to First Token", "TTFT"),
    "tpot": ("Time per Output Token (excl. 1st token)", "TPOT"),
    "itl": ("Inter-token Latency", "ITL"),
    "e2el": ("End-to-end Latency", "E2EL"),
}
GOODPUT_METRICS = ("ttft", "tpot", "e2el")


@dataclass
class RequestResult:
    """What one request did, timed on the client (seconds, perf_counter clock)."""

    prompt_len: int
    success: bool = False
    output_tokens: int = 0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    start_time: float = 0.0
    generated_text: str = ""
    error: str = ""
    # a constrained request: whether its answer followed its schema (None: free text)
    follows_schema: bool | None = None

    @property
    def tpot(self) -> float | None:
        if self.output_tokens <= 1:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


@dataclass(frozen=True)
class Distribution:
    """mean, median, std and the chosen percentiles of one latency, in milliseconds."""

    mean: float
    median: float
    std: float
    percentiles: tuple[tuple[float, float], ...]  # (percentile, value)

    @classmethod
    def of(cls, seconds: Sequence[float], percentiles: Sequence[float]) -> Distribution:
        ms = sorted(s * 1000.0 for s in seconds)
        if not ms:
            return cls(0.0, 0.0, 0.0, tuple((p, 0.0) for p in percentiles))
        return cls(
            statistics.fmean(ms),
            percentile(ms, 50),
            statistics.pstdev(ms),
            tuple((p, percentile(ms, p)) for p in percentiles),
        )


@dataclass(frozen=True)
class StructuredOutputCount:
    """The constrained requests of a run and how many answers followed their schema (a
    failed request's did not)."""

    constrained: int
    valid: int

    @property
    def correct_rate(self) -> float:
        """Per cent of the constrained requests whose answer was valid (vLLM's correct_rate(%))."""
        return 100.0 * self.valid / self.constrained if self.constrained else 0.0


@dataclass(frozen=True)
class BenchmarkMetrics:
    completed: int
    failed: int
    total_input: int
    total_output: int
    duration: float
    request_throughput: float
    request_goodput: float | None  # None without --goodput
    output_throughput: float
    total_token_throughput: float
    max_output_tokens_per_s: float
    max_concurrent_requests: int
    latencies: dict[str, Distribution]  # "ttft", "tpot", "itl", "e2el"
    structured_outputs: StructuredOutputCount | None = None  # None: no request was constrained


def parse_goodput(items: Iterable[str]) -> dict[str, float]:
    """`--goodput ttft:500 tpot:50` → {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    slos = {}
    for item in items:
        name, sep, value = item.partition(":")
        if not sep or name not in GOODPUT_METRICS:
            raise ValueError(
                f"--goodput {item!r}: write NAME:MILLISECONDS with NAME one of {', '.join(GOODPUT_METRICS)}, "
                "e.g. --goodput ttft:500 tpot:50"
            )
        try:
            slos[name] = float(value)
        except ValueError:
            raise ValueError(f"--goodput {item!r}: {value!r} is not a number of milliseconds") from None
        if slos[name] < 0:
            raise ValueError(f"--goodput {item!r}: an SLO cannot be negative")
    return slos


def meets_slos(result: RequestResult, slos: dict[str, float]) -> bool:
    """Whether a successful request met every SLO (milliseconds)."""
    observed = {"ttft": result.ttft, "tpot": result.tpot or 0.0, "e2el": result.latency}
    return all(observed[name] * 1000.0 <= limit for name, limit in slos.items())


def compute_metrics(
    results: Sequence[RequestResult],
    duration: float,
    percentiles: Sequence[float] = (99.0,),
    goodput_slos: dict[str, float] | None = None,
) -> BenchmarkMetrics:
    """The benchmark's figures from every request's result; `duration` is the wall time
    of the whole run in seconds."""
    done = [r for r in results if r.success]
    total_input = sum(r.prompt_len for r in done)
    total_output = sum(r.output_tokens for r in done)
    samples = latency_samples(done)
    per_s = 1.0 / duration if duration > 0 else 0.0
    goodput = None
    if goodput_slos:
        goodput = sum(1 for r in done if meets_slos(r, goodput_slos)) * per_s
    checked = [r.follows_schema for r in results if r.follows_schema is not None]
    structured = StructuredOutputCount(len(checked), sum(checked)) if checked else None
    return BenchmarkMetrics(
        completed=len(done),
        failed=len(results) - len(done),
        total_input=total_input,
        total_output=total_output,
        duration=duration,
        request_throughput=len(done) * per_s,
        request_goodput=goodput,
        output_throughput=total_output * per_s,
        total_token_throughput=(total_input + total_output) * per_s,
        max_output_tokens_per_s=peak_output_tokens_per_s(done),
        max_concurrent_requests=peak_concurrency(results),
        latencies={name: Distribution.of(values, percentiles) for name, values in samples.items()},
        structured_outputs=structured,
    )


def latency_samples(results: Sequence[RequestResult]) -> dict[str, list[float]]:
    """Every sample of each latency metric (seconds) from the successful requests."""
    done = [r for r in results if r.success]
    return {
        "ttft": [r.ttft for r in done],
        "tpot": [t for t in (r.tpot for r in done) if t is not None],
        "itl": [gap for r in done for gap in r.itl],
        "e2el": [r.latency for r in done],
    }


def token_times(result: RequestResult) -> list[float]:
    """When each streamed chunk of a successful request arrived (seconds, client clock)."""
    if not result.success:
        return []
    times = [result.start_time + result.ttft]
    for gap in result.itl:
        times.append(times[-1] + gap)
    return times


def peak_output_tokens_per_s(results: Sequence[RequestResult]) -> float:
    """The most streamed tokens that arrived within one whole second of the run (counted
    in one-second buckets from the first request's start, as vLLM counts them)."""
    done = [r for r in results if r.success]
    if not done:
        return 0.0
    start = min(r.start_time for r in done)
    buckets: dict[int, int] = {}
    for r in done:
        for t in token_times(r):
            second = int(t - start)
            buckets[second] = buckets.get(second, 0) + 1
    return float(max(buckets.values()))


def peak_concurrency(results: Sequence[RequestResult]) -> int:
    """The most requests in flight at one moment (a request is in flight from its start to
    its last chunk; one ending when another starts is not counted with it)."""
    events = []
    for r in results:
        events.append((r.start_time, 1))
        events.append((r.start_time + r.latency, -1))
    in_flight = peak = 0
    for _, change in sorted(events):  # at equal times, -1 sorts before +1
        in_flight += change
        peak = max(peak, in_flight)
    return peak
