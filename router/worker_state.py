"""The router's view of one worker: who it is, where to reach it, whether it is healthy,
and how loaded it is.

Load comes from two places. Workers send load reports (common/protocol.py's LoadReport,
the figures of their own Prometheus gauges), kept here as they arrive; they count every
router's requests, but they are a little old when they arrive. The router also notes
each request it sends until the worker's next report takes it into account (or the
request leaves the worker), so a burst of requests does not all land on the worker that
looked idle a moment ago; with no reports at all, these notes alone are the load. The
properties (`queued_prefill_tokens`, `num_active_requests`, `kv_usage`,
`active_kv_blocks`) add the two; they are what the routing scorers read.

A report takes a few tens of ms to arrive, so it does not yet count the requests sent
just before it arrived: those sent within REPORT_LAG_S of it stay noted on top of it
(counted twice for a moment rather than not at all, which would send a burst to one
worker). From successive reports the router also measures the worker's prefill speed
(`prefill_tokens_per_s`): prompt tokens it computed per second while it had prompt
tokens queued, so a slower worker, or one whose decode batch slows its prefill, is seen
as such. Torch-free.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from common.protocol import LoadReport, WorkerRole

# How long a load report takes to reach the router, at most (event delay of a loaded host):
# requests sent this recently are not in it yet.
REPORT_LAG_S = 0.05
# Weight of the newest interval in the measured prefill speed (an exponential mean).
PREFILL_SPEED_SMOOTHING = 0.2
# Intervals shorter than this say little about a speed (one engine step or less).
MIN_SPEED_INTERVAL_S = 0.02


@dataclass
class _SentRequest:
    prefill_tokens: int  # 0 once its prefill is done
    kv_blocks: int
    sent_at: float = -math.inf  # on the worker state's clock


@dataclass(eq=False)
class WorkerState:
    worker_id: str
    role: WorkerRole
    address: str  # where requests go
    healthy: bool = True
    load: LoadReport = field(default_factory=LoadReport)
    load_received_at: float = -math.inf  # on `clock`
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    # requests sent since the last load report, by request id, oldest first
    _unreported: dict[str, _SentRequest] = field(default_factory=dict, repr=False)
    _unreported_prefill_tokens: int = field(default=0, repr=False)
    _unreported_kv_blocks: int = field(default=0, repr=False)
    # measured prefill speed (tokens/s), None until measured
    prefill_tokens_per_s: float | None = None

    # -- what the scorers read ------------------------------------------------------

    @property
    def queued_prefill_tokens(self) -> int:
        """Prompt tokens this worker still has to prefill."""
        return self.load.num_queued_prefill_tokens + self._unreported_prefill_tokens

    @property
    def num_active_requests(self) -> int:
        """Requests running or waiting on this worker."""
        return self.load.num_running + self.load.num_waiting + len(self._unreported)

    @property
    def active_kv_blocks(self) -> int:
        """KV blocks in use, counting the blocks of requests sent since the last report."""
        reported = round(self.load.kv_cache_usage * self.load.num_kv_blocks)
        return reported + self._unreported_kv_blocks

    @property
    def kv_usage(self) -> float:
        """Fraction of the KV cache in use, 0 to 1."""
        if self.load.num_kv_blocks <= 0:
            return self.load.kv_cache_usage
        return min(1.0, self.active_kv_blocks / self.load.num_kv_blocks)

    # -- what the router tells it -------------------------------------------------------

    def update_load(self, report: LoadReport) -> None:
        """Take a new load report; it counts every request sent more than REPORT_LAG_S
        before it arrived."""
        now = self.clock()
        self._measure_prefill_speed(report, now)
        self.load = report
        self.load_received_at = now
        recent = {rid: sent for rid, sent in self._unreported.items() if now - sent.sent_at < REPORT_LAG_S}
        self._unreported = recent
        self._unreported_prefill_tokens = sum(sent.prefill_tokens for sent in recent.values())
        self._unreported_kv_blocks = sum(sent.kv_blocks for sent in recent.values())

    def _measure_prefill_speed(self, report: LoadReport, now: float) -> None:
        # Only an interval with prompt tokens queued at both ends shows the worker's speed
        # (it was prefilling throughout); an idle worker computes little because it was
        # given little. A restart (another engine id) starts its counter over.
        previous = self.load
        interval = now - self.load_received_at
        computed = report.num_prompt_tokens_total - previous.num_prompt_tokens_total
        if (
            previous.num_queued_prefill_tokens <= 0
            or report.num_queued_prefill_tokens <= 0
            or report.engine_id != previous.engine_id
            or computed <= 0
            or not MIN_SPEED_INTERVAL_S <= interval < math.inf
        ):
            return
        sample = computed / interval
        if self.prefill_tokens_per_s is None:
            self.prefill_tokens_per_s = sample
        else:
            a = PREFILL_SPEED_SMOOTHING
            self.prefill_tokens_per_s = (1 - a) * self.prefill_tokens_per_s + a * sample

    def note_request_sent(self, request_id: str, prefill_tokens: int, kv_blocks: int = 0) -> None:
        """The router sent `request_id`, which makes this worker prefill `prefill_tokens`
        tokens (its prompt less what is cached there) and hold `kv_blocks` more blocks."""
        self.note_request_finished(request_id)
        self._unreported[request_id] = _SentRequest(prefill_tokens, kv_blocks, self.clock())
        self._unreported_prefill_tokens += prefill_tokens
        self._unreported_kv_blocks += kv_blocks

    def note_prefill_done(self, request_id: str) -> None:
        """`request_id`'s prompt is prefilled on this worker (or its prefill failed)."""
        sent = self._unreported.get(request_id)
        if sent is not None:
            self._unreported_prefill_tokens -= sent.prefill_tokens
            sent.prefill_tokens = 0

    def note_request_finished(self, request_id: str) -> None:
        """`request_id` left this worker (finished, failed, aborted, or its KV was pulled)."""
        sent = self._unreported.pop(request_id, None)
        if sent is not None:
            self._unreported_prefill_tokens -= sent.prefill_tokens
            self._unreported_kv_blocks -= sent.kv_blocks
