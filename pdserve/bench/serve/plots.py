"""`--plot DIR`: PNG charts of a benchmark (matplotlib, Agg backend, imported only here).

- ttft_cdf.png, tpot_cdf.png, itl_cdf.png, e2el_cdf.png: the cumulative distribution of
  each latency, one line per request rate;
- throughput_vs_rate.png, when several request rates ran: output token throughput and
  request throughput against the configured rate (achieved request rate below the
  offered one means the server saturated).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pdserve.bench.serve.metrics import (
    LATENCY_METRICS,
    METRIC_TITLES,
    BenchmarkMetrics,
    RequestResult,
    latency_samples,
)


@dataclass(frozen=True)
class PlottedRun:
    request_rate: float
    results: Sequence[RequestResult]
    metrics: BenchmarkMetrics


def write_plots(runs: Sequence[PlottedRun], out_dir: str) -> list[Path]:
    """Write the charts into `out_dir` (created if missing); the paths written."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name in LATENCY_METRICS:
        title, short = METRIC_TITLES[name]
        figure, axes = plt.subplots(figsize=(6.4, 4.0))
        for run in runs:
            values = sorted(v * 1000.0 for v in latency_samples(run.results)[name])
            if values:
                fractions = [i / len(values) for i in range(len(values) + 1)]
                label = f"rate {_rate_label(run.request_rate)}"
                axes.step([values[0], *values], fractions, where="post", label=label)
        axes.set_xlabel(f"{short} (ms)")
        axes.set_ylabel("fraction of samples")
        axes.set_ylim(0, 1.02)
        axes.set_title(f"{title}: CDF")
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend()
        written.append(_save(figure, directory / f"{name}_cdf.png", plt))
    if len(runs) > 1:
        written.append(_throughput_vs_rate(runs, directory / "throughput_vs_rate.png", plt))
    return written


def _throughput_vs_rate(runs: Sequence[PlottedRun], path: Path, plt) -> Path:
    labels = [_rate_label(run.request_rate) for run in runs]
    positions = list(range(len(runs)))
    figure, tokens_axes = plt.subplots(figsize=(6.4, 4.0))
    tokens_axes.plot(positions, [run.metrics.output_throughput for run in runs], "o-", color="tab:blue")
    tokens_axes.set_ylabel("output tokens/s", color="tab:blue")
    tokens_axes.set_xticks(positions, labels)
    tokens_axes.set_xlabel("configured request rate (req/s)")
    requests_axes = tokens_axes.twinx()
    requests_axes.plot(positions, [run.metrics.request_throughput for run in runs], "s--", color="tab:orange")
    requests_axes.set_ylabel("requests/s completed", color="tab:orange")
    tokens_axes.set_title("Throughput against request rate")
    tokens_axes.grid(alpha=0.3)
    return _save(figure, path, plt)


def _save(figure, path: Path, plt) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _rate_label(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"
