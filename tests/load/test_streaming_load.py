"""Load: many concurrent streaming clients against a real `pdserve serve` on the default
model (CPU) for a while. Nothing fails except deliberate refusals (429, or 503 when no
worker is healthy, each with Retry-After and the OpenAI error body); every accepted
request ends with `data: [DONE]` and no error event; the router's memory stays bounded;
the workers' KV usage and the router's in-flight and queued gauges return to their
baseline at the end.

CI runs the bounded version. The full one (500 clients for 60 s) is marked slow:

    pytest tests/load -m slow -s

and prints its counts (requests sent, accepted, refused, completed, lost, router RSS).
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.harness.stack import ServeStack, alive, metric

MAX_TOKENS = 8
# the router's memory may grow this much under load (buffers, metrics series), no more
RSS_GROWTH_LIMIT_MB = 256
KV_SETTLE_TIMEOUT_S = 60.0
PROMPTS = [
    "The three primary colors are red, yellow and blue. Mixing two of them gives",
    "def fibonacci(n):\n",
    "Write one sentence about the sea.",
    "List three fruits:",
]


@dataclass
class Counts:
    sent: int = 0
    accepted: int = 0
    completed: int = 0
    refused: dict[int, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)  # anything that is neither

    @property
    def lost(self) -> int:
        return self.accepted - self.completed


async def _client(http: httpx.AsyncClient, counts: Counts, deadline: float, rng: random.Random) -> None:
    while time.monotonic() < deadline:
        body = {"prompt": rng.choice(PROMPTS), "max_tokens": MAX_TOKENS, "stream": True, "temperature": 0}
        counts.sent += 1
        async with http.stream("POST", "/v1/completions", json=body) as response:
            text = (await response.aread()).decode("utf-8", "replace")
            if response.status_code == 200:
                counts.accepted += 1
                events = [b[len("data: ") :] for b in text.split("\n\n") if b.startswith("data: ")]
                errors = [e for e in events if e != "[DONE]" and "error" in json.loads(e)]
                if events and events[-1] == "[DONE]" and not errors:
                    counts.completed += 1
                else:
                    counts.failures.append(f"accepted stream did not complete: {text[-300:]!r}")
                continue
            if response.status_code not in (429, 503):
                counts.failures.append(f"status {response.status_code}: {text[:300]!r}")
                continue
            counts.refused[response.status_code] = counts.refused.get(response.status_code, 0) + 1
            retry_after = response.headers.get("retry-after")
            error = json.loads(text).get("error", {})
            if retry_after is None or not retry_after.isdigit() or error.get("code") != response.status_code:
                counts.failures.append(f"refusal without Retry-After or error body: {text[:300]!r}")
                continue
        # as a well-behaved client: wait what Retry-After says, spread out a little
        await asyncio.sleep(int(retry_after) * rng.uniform(0.5, 1.5))


async def _drive(url: str, clients: int, duration_s: float) -> Counts:
    counts = Counts()
    deadline = time.monotonic() + duration_s
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    timeout = httpx.Timeout(600.0, connect=60.0)  # an accepted request is waited for
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as http:
        results = await asyncio.gather(
            *(_client(http, counts, deadline, random.Random(i)) for i in range(clients)),
            return_exceptions=True,
        )
    counts.failures += [f"client raised {r!r}" for r in results if isinstance(r, BaseException)]
    return counts


async def _peak_kv_usage(stack: ServeStack, duration_s: float) -> float:
    """The highest KV usage any worker reports while the load runs (proves the gauge moves)."""
    peak = 0.0
    deadline = time.monotonic() + duration_s
    while time.monotonic() < deadline:
        peak = max(peak, *await asyncio.to_thread(_kv_usage, stack))
        await asyncio.sleep(0.5)
    return peak


async def _load_and_watch(stack: ServeStack, clients: int, duration_s: float) -> tuple[Counts, float]:
    return await asyncio.gather(_drive(stack.url, clients, duration_s), _peak_kv_usage(stack, duration_s))


def _rss_mb(pid: int) -> float:
    match = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
    assert match, f"no VmRSS for pid {pid}"
    return int(match.group(1)) / 1024


def _router_pid(stack: ServeStack) -> int:
    for pid in stack.children():
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"router" in cmdline:
            return pid
    raise AssertionError(f"no router process among the children of pdserve serve:\n{stack.tail()}")


def _kv_usage(stack: ServeStack) -> list[float]:
    ports = [port for role in ("prefill", "decode") for _, port in stack.workers[role]]
    assert len(ports) == 2, f"expected a prefill and a decode worker: {stack.workers}"
    for port in ports:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        assert "vllm:kv_cache_usage_perc{" in text, f"worker on metrics port {port} has no KV usage gauge"
    return [metric(f"http://127.0.0.1:{port}", "vllm:kv_cache_usage_perc") for port in ports]


def _run_load(clients: int, duration_s: float, max_num_seqs: int) -> Counts:
    stack = ServeStack(
        [
            "--dtype", "float32", "--device", "cpu", "--max-model-len", "256", "--num-prefill-workers", "1",
            # the router's default limit is the decode worker's --max-num-seqs; as many may queue
            "--max-num-seqs", str(max_num_seqs),
            "--max-queue-wait", "30",
            "--disable-uvicorn-access-log", "--uvicorn-log-level", "warning",
            # a CPU engine step can keep a worker silent for seconds on a busy machine
            "--worker-health-timeout", "60",
        ]
    )  # fmt: skip
    try:
        stack.ready()
        router = _router_pid(stack)
        warm = httpx.post(stack.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=120)
        assert warm.status_code == 200, warm.text
        baseline_kv = _kv_usage(stack)
        rss_before = _rss_mb(router)

        counts, peak_kv = asyncio.run(_load_and_watch(stack, clients, duration_s))
        rss_after = _rss_mb(router)

        deadline = time.monotonic() + KV_SETTLE_TIMEOUT_S
        while time.monotonic() < deadline and any(
            now > base + 1e-6 for now, base in zip(_kv_usage(stack), baseline_kv, strict=True)
        ):
            time.sleep(0.5)
        final_kv = _kv_usage(stack)
        in_flight = metric(stack.url, "pdserve_router_requests_in_flight")
        queued = metric(stack.url, "pdserve_router_requests_queued")
        print(
            f"\nload: {clients} clients x {duration_s:g} s: sent {counts.sent}, accepted {counts.accepted}, "
            f"refused {counts.refused}, completed {counts.completed}, lost {counts.lost}, "
            f"failures {len(counts.failures)}; router RSS {rss_before:.1f} -> {rss_after:.1f} MiB; "
            f"KV usage {baseline_kv} -> peak {peak_kv:.3f} -> {final_kv}; in flight {in_flight:g}, queued {queued:g}"
        )
        assert counts.failures == [], counts.failures[:10]
        assert counts.accepted > 0 and counts.lost == 0
        assert counts.sent == counts.accepted + sum(counts.refused.values())
        assert rss_after - rss_before < RSS_GROWTH_LIMIT_MB
        assert peak_kv > max(baseline_kv)  # the load did hold KV blocks ...
        # ... and gave every one back
        assert all(now <= base + 1e-6 for now, base in zip(final_kv, baseline_kv, strict=True))
        assert (in_flight, queued) == (0, 0)
        return counts
    finally:
        children = stack.children()
        stack.stop()
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.1)


def test_100_streaming_clients_for_20_s_are_answered_or_refused_with_retry_after():
    counts = _run_load(clients=100, duration_s=20, max_num_seqs=16)
    # 100 clients against 16 slots and 16 queue places: the refusals were exercised
    assert counts.refused.get(429, 0) > 0


@pytest.mark.slow
def test_500_streaming_clients_for_60_s_lose_nothing():
    _run_load(clients=500, duration_s=60, max_num_seqs=64)
