"""The KV pulls of a run as the decode workers measured them (--worker-metrics-url).

Each worker's /metrics is scraped before and after the run; the run's pulls are the
difference of the histograms' _sum and _count, summed over the workers given. Two
views of the same pulls stand side by side: the worker's (pdserve:kv_pull_seconds and
pdserve:kv_pull_bytes: from handing the pull to the connector until its blocks are
usable) and the connector's own (vllm:nixl_xfer_time_seconds and
vllm:nixl_bytes_transferred: from the start of the data movement to its recorded end).
A worker's other requests in the meantime count too: scrape workers that only this run
loads. Torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
from prometheus_client.parser import text_string_to_metric_families

PULL_SECONDS = "pdserve:kv_pull_seconds"
PULL_BYTES = "pdserve:kv_pull_bytes"
XFER_SECONDS = "vllm:nixl_xfer_time_seconds"
XFER_BYTES = "vllm:nixl_bytes_transferred"
LOAD_FAILURES = "pdserve:kv_load_failures_total"
HISTOGRAMS = (PULL_SECONDS, PULL_BYTES, XFER_SECONDS, XFER_BYTES)
# the samples the figures read, summed over every label set
SAMPLES = frozenset({*(f"{h}_{part}" for h in HISTOGRAMS for part in ("sum", "count")), LOAD_FAILURES})
_SCRAPE_TIMEOUT_S = 10.0
WHERE_THE_URL_IS = (
    "`pdserve serve` prints 'decode worker N ID at ADDRESS (metrics on port PORT)' for each "
    "worker, so give http://127.0.0.1:PORT; a worker started alone (pdserve decode) serves "
    "it at its --metrics-host and --metrics-port, the port also written as metrics_port in "
    "its --ready-file"
)


def metrics_url(url: str) -> str:
    """A --worker-metrics-url as scraped: http(s)://HOST:PORT, with /metrics added unless given."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"--worker-metrics-url {url!r} is not an http:// URL; {WHERE_THE_URL_IS}")
    url = url.rstrip("/")
    return url if parts.path.rstrip("/").endswith("/metrics") else url + "/metrics"


def sample_totals(text: str) -> dict[str, float]:
    """The samples of SAMPLES in a Prometheus text exposition, each summed over its label
    sets (engines, roles); a histogram the text lacks is absent from the result."""
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in SAMPLES:
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


@dataclass(frozen=True)
class KVPullFigures:
    """The pulls between two scrapes: counts, means and effective rates (GB = 1e9 bytes)."""

    num_pulls: int
    num_failed_pulls: int  # pdserve:kv_load_failures: failed, or could not start
    mean_pull_ms: float | None  # None without pulls
    mean_pull_bytes: float | None
    pull_gb_per_s: float | None  # the pulls' bytes over their summed time
    num_connector_transfers: int  # the connector's records: one per pull (per rank's part under TP)
    mean_connector_xfer_ms: float | None
    connector_gb_per_s: float | None

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))


def kv_pull_figures(before: dict[str, float], after: dict[str, float]) -> KVPullFigures:
    """What happened between two sample_totals (summed over the same workers)."""

    def grown(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    num_pulls = round(grown(f"{PULL_SECONDS}_count"))
    pull_s, pull_bytes = grown(f"{PULL_SECONDS}_sum"), grown(f"{PULL_BYTES}_sum")
    num_xfers = round(grown(f"{XFER_SECONDS}_count"))
    xfer_s, xfer_bytes = grown(f"{XFER_SECONDS}_sum"), grown(f"{XFER_BYTES}_sum")
    return KVPullFigures(
        num_pulls=num_pulls,
        num_failed_pulls=round(grown(LOAD_FAILURES)),
        mean_pull_ms=pull_s / num_pulls * 1e3 if num_pulls else None,
        mean_pull_bytes=pull_bytes / num_pulls if num_pulls else None,
        pull_gb_per_s=pull_bytes / pull_s / 1e9 if num_pulls and pull_s > 0 else None,
        num_connector_transfers=num_xfers,
        mean_connector_xfer_ms=xfer_s / num_xfers * 1e3 if num_xfers else None,
        connector_gb_per_s=xfer_bytes / xfer_s / 1e9 if num_xfers and xfer_s > 0 else None,
    )


class WorkerMetricsScrape:
    """The decode workers' /metrics, read together: one snapshot of summed samples."""

    def __init__(self, urls: Sequence[str]) -> None:
        self.urls = [metrics_url(url) for url in urls]

    def snapshot(self) -> dict[str, float]:
        """The summed samples of every worker now; RuntimeError, saying which URL, when one
        cannot be read or exports no pdserve:kv_pull_seconds (not a worker's endpoint)."""
        totals: dict[str, float] = {}
        for url in self.urls:
            for name, value in self._scrape(url).items():
                totals[name] = totals.get(name, 0.0) + value
        return totals

    def _scrape(self, url: str) -> dict[str, float]:
        try:
            response = httpx.get(url, timeout=_SCRAPE_TIMEOUT_S, trust_env=False)
            response.raise_for_status()
            found = sample_totals(response.text)
        except (httpx.HTTPError, ValueError) as exc:
            raise RuntimeError(
                f"cannot read the worker metrics at {url}: {exc}; {WHERE_THE_URL_IS}"
            ) from None
        if f"{PULL_SECONDS}_count" not in found:
            raise RuntimeError(
                f"{url} exports no {PULL_SECONDS}: it is not a pdserve worker's metrics endpoint "
                f"(the router's /metrics has none); {WHERE_THE_URL_IS}"
            )
        return found
