"""The router's view of one worker: who it is, where to reach it, whether it is healthy,
and how loaded it is.

Load comes from two places. Workers send load reports (common/protocol.py's LoadReport,
the figures of their own Prometheus gauges), kept here as they arrive; they count every
router's requests, but they are a little old when they arrive. The router also notes
each request it sends until the worker's next report takes it into account (or the
request leaves the worker), so a burst of requests does not all land on the worker that
looked idle a moment ago; with no reports at all, these notes alone are the load. The
properties (`queued_prefill_tokens`, `num_active_requests`, `kv_usage`,
`active_kv_blocks`) add the two; they are what the routing scorers read. Torch-free.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from common.protocol import LoadReport, WorkerRole


@dataclass
class _SentRequest:
    prefill_tokens: int  # 0 once its prefill is done
    kv_blocks: int


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
        """Take a new load report; it counts every request sent before it arrived."""
        self.load = report
        self.load_received_at = self.clock()
        self._unreported.clear()
        self._unreported_prefill_tokens = 0
        self._unreported_kv_blocks = 0

    def note_request_sent(self, request_id: str, prefill_tokens: int, kv_blocks: int = 0) -> None:
        """The router sent `request_id`, which makes this worker prefill `prefill_tokens`
        tokens (its prompt less what is cached there) and hold `kv_blocks` more blocks."""
        self.note_request_finished(request_id)
        self._unreported[request_id] = _SentRequest(prefill_tokens, kv_blocks)
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
