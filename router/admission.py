"""Admission control: how many generation requests the router answers at once, and how
many wait for a turn, both bounded.

    admission = AdmissionControl(limits, capacity=decode_capacity(pool))
    admission.check_room()                    # cheap: 429 at once when even the queue is full
    slot = await admission.admit(disconnected)  # a slot, after a wait in the queue if need be
    try: ... answer ...
    finally: slot.release()

Up to `limit` requests are in flight; the next `queue_limit` wait in arrival order (FIFO)
for one of them to finish; beyond that a request is refused at once with 429 and
Retry-After, and so is one that waited `max_queue_wait_s` without a turn. A queued
request whose client goes away leaves the queue. Nothing grows without bound, and a
request that got a slot keeps it until it is answered.

The in-flight limit is --max-concurrent-requests, or by default what the decode workers
can run at once: the sum of their --max-num-seqs as they report it (LoadReport.max_num_seqs;
256, vLLM's default, for a worker that does not say). The queue limit is
--max-queued-requests, by default the in-flight limit. Retry-After is the time the
requests ahead are expected to take, from the mean duration of recent requests.
Torch-free.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from common.protocol import WorkerRole
from router.errors import RetryLater
from router.metrics import RouterMetrics
from router.worker_pool import WorkerPool

logger = logging.getLogger(__name__)

# a decode worker that does not report its --max-num-seqs runs vLLM's default
DEFAULT_WORKER_MAX_NUM_SEQS = 256
DEFAULT_MAX_QUEUE_WAIT_S = 60.0
MAX_RETRY_AFTER_S = 60
# weight of the newest request in the mean request duration behind Retry-After
_DURATION_EWMA_WEIGHT = 0.05


class TooManyRequests(RetryLater):
    """The router is full and so is its queue (or the wait ran out): 429 with Retry-After."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message, retry_after_s)
        self.status = 429
        self.type = "RateLimitError"


class ClientGone(Exception):
    """The client disconnected while its request waited in the queue."""


@dataclass
class AdmissionLimits:
    max_in_flight: int | None = None  # None: the decode workers' capacity
    max_queued: int | None = None  # None: the in-flight limit
    max_queue_wait_s: float = DEFAULT_MAX_QUEUE_WAIT_S


class Slot:
    """One admitted request's place; release() once it is answered (again is harmless)."""

    def __init__(self, admission: AdmissionControl) -> None:
        self._admission = admission
        self._since = time.monotonic()
        self._released = False

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._admission._release(time.monotonic() - self._since)


class AdmissionControl:
    def __init__(
        self,
        limits: AdmissionLimits,
        capacity: Callable[[], int] | None = None,
        metrics: RouterMetrics | None = None,
    ) -> None:
        """`capacity()`: requests the workers can run at once, read when no explicit
        in-flight limit is set."""
        self.limits = limits
        self._capacity = capacity
        self._metrics = metrics
        self.in_flight = 0
        self._waiting: deque[asyncio.Future[Slot]] = deque()
        self._mean_duration_s = 1.0
        self._update_gauges()

    @property
    def limit(self) -> int:
        if self.limits.max_in_flight is not None:
            return self.limits.max_in_flight
        capacity = self._capacity() if self._capacity is not None else DEFAULT_WORKER_MAX_NUM_SEQS
        return max(1, capacity)

    @property
    def queue_limit(self) -> int:
        return self.limits.max_queued if self.limits.max_queued is not None else self.limit

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def check_room(self) -> None:
        """Raise TooManyRequests when a request arriving now could neither run nor wait."""
        if self.in_flight >= self.limit and self.queued >= self.queue_limit:
            self._reject("queue_full")

    async def admit(self, disconnected: Callable[[], Awaitable[object]] | None = None) -> Slot:
        """A slot now if one is free and nobody waits, else after a wait in the queue.
        TooManyRequests when the queue is full or the wait exceeds max_queue_wait_s;
        ClientGone when `disconnected()` completes first (the client left the queue)."""
        self._grant_free_slots()  # the limit may have grown since the last release
        if self.in_flight < self.limit and not self._waiting:
            return self._take()
        if self.queued >= self.queue_limit:
            self._reject("queue_full")
        turn: asyncio.Future[Slot] = asyncio.get_running_loop().create_future()
        self._waiting.append(turn)
        self._update_gauges()
        watcher = asyncio.ensure_future(disconnected()) if disconnected is not None else None
        granted: Slot | None = None
        try:
            waits = {turn} if watcher is None else {turn, watcher}
            await asyncio.wait(
                waits, timeout=self.limits.max_queue_wait_s, return_when=asyncio.FIRST_COMPLETED
            )
            client_gone = watcher is not None and watcher.done() and not watcher.cancelled()
            if client_gone and watcher.exception() is not None:  # type: ignore[union-attr]
                logger.debug("watching the queued client failed: %r", watcher.exception())  # type: ignore[union-attr]
            if turn.done() and not turn.cancelled() and not client_gone:
                granted = turn.result()
                return granted
        finally:
            if watcher is not None:
                watcher.cancel()
            if not turn.done():
                turn.cancel()
            elif not turn.cancelled() and granted is None:
                turn.result().release()  # granted, but the client left or this task was cancelled
            if turn in self._waiting:
                self._waiting.remove(turn)
            self._update_gauges()
        if client_gone:
            self._count("client_gone")
            raise ClientGone("the client disconnected while its request was queued")
        self._reject("queue_timeout")
        raise AssertionError("unreachable")  # _reject raises

    # -- inside -----------------------------------------------------------------------

    def _take(self) -> Slot:
        self.in_flight += 1
        self._update_gauges()
        return Slot(self)

    def _release(self, duration_s: float) -> None:
        self.in_flight -= 1
        self._mean_duration_s += _DURATION_EWMA_WEIGHT * (duration_s - self._mean_duration_s)
        self._grant_free_slots()
        self._update_gauges()

    def _grant_free_slots(self) -> None:
        while self._waiting and self.in_flight < self.limit:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(self._take())

    def retry_after_s(self) -> int:
        """Seconds until the requests in flight and in the queue are expected to be through."""
        rounds = (self.in_flight + self.queued) / max(self.limit, 1)
        return max(1, min(MAX_RETRY_AFTER_S, math.ceil(rounds * self._mean_duration_s)))

    def _reject(self, reason: str) -> None:
        self._count(reason)
        if reason == "queue_timeout":
            message = (
                f"no request slot freed within {self.limits.max_queue_wait_s:g} s "
                "(--max-queue-wait); the router is overloaded, retry after the Retry-After seconds"
            )
        else:
            message = (
                f"the router is answering {self.in_flight} requests (--max-concurrent-requests "
                f"{self.limit}) and {self.queued} more wait (--max-queued-requests {self.queue_limit}); "
                "retry after the Retry-After seconds"
            )
        raise TooManyRequests(message, self.retry_after_s())

    def _count(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.requests_rejected.labels(reason).inc()

    def _update_gauges(self) -> None:
        if self._metrics is None:
            return
        model = self._metrics.model_name
        self._metrics.requests_in_flight.labels(model).set(self.in_flight)
        self._metrics.requests_queued.labels(model).set(self.queued)


def decode_capacity(pool: WorkerPool) -> Callable[[], int]:
    """What the routable decode workers can run at once: the sum of their max_num_seqs."""

    def capacity() -> int:
        total = 0
        for client in pool.routable(WorkerRole.DECODE):
            seqs = client.last_report.max_num_seqs if client.last_report is not None else 0
            total += seqs or DEFAULT_WORKER_MAX_NUM_SEQS  # 0: the worker does not say
        return total or DEFAULT_WORKER_MAX_NUM_SEQS

    return capacity
