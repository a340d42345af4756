"""A worker's side of the Redis registry (common/registry.py): keep its record alive.

A daemon thread writes the worker's record with a TTL and rewrites it BEATS_PER_TTL
times per TTL, with the load the serving loop saw last. The first write (and the first
after Redis lost the key: a restart, a flush) announces the worker on the registry
channel. While Redis cannot be reached the worker goes on serving and the thread keeps
trying; routers that know the worker keep it meanwhile. `close()` deletes the record
and announces the departure, so routers drop the worker at once rather than after the
TTL. The serving loop is never blocked by Redis: it only hands over its stats object.
Torch-free; `redis` is imported when a heartbeat starts.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from common.registry import BEATS_PER_TTL, CHANNEL, WorkerRecord, redacted, worker_key
from common.worker.load_reports import LoadReporter
from common.worker.load_reports import load_of as report_load_of

logger = logging.getLogger(__name__)


class RecordingLoadReporter(LoadReporter):
    """A LoadReporter that keeps the engine stats of the serving loop's last turn, for the
    heartbeat thread (an EngineStats is built fresh each turn and never changed, so the
    other thread reads it safely)."""

    last_stats: Any = None

    def due(self, stats: Any) -> Any:
        self.last_stats = stats
        return super().due(stats)


def load_of(stats: Any) -> dict[str, float]:
    """The load figures of EngineStats `stats` as the record carries them: a LoadReport's,
    the usage rounded for readers of the registry."""
    if stats is None:
        return {}
    load = report_load_of(stats)
    load["kv_cache_usage"] = round(load["kv_cache_usage"], 4)
    return load


class RegistryHeartbeat:
    def __init__(
        self,
        url: str,
        record: WorkerRecord,
        load: Callable[[], dict[str, float]] = dict,
        *,
        client: Any = None,
    ) -> None:
        """Keep `record` in the registry at `url` with `load()` as its load, once started.
        `client` is a redis.Redis to use instead of one built from `url`."""
        self.url = url
        self.record = record
        self._load = load
        self.interval_s = record.ttl_s / BEATS_PER_TTL
        if client is None:
            import redis

            timeout = min(2.0, self.interval_s)
            client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self._client = client
        self._key = worker_key(record.worker_id)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reachable: bool | None = None  # None until the first try
        self.num_beats = 0

    def start(self) -> None:
        self.record.started_at = time.time()
        self._thread = threading.Thread(target=self._run, name="registry-heartbeat", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop beating and take the record out of the registry (best effort: a Redis that
        is down lets it expire instead)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + 5)
            self._thread = None
        try:
            if self._holds_our_record():
                self._client.delete(self._key)
                self._announce("down")
                logger.info("left the worker registry at %s", redacted(self.url))
        except Exception as exc:
            logger.warning(
                "could not leave the worker registry at %s (%s); the record expires after %.0f s",
                redacted(self.url), exc, self.record.ttl_s,
            )  # fmt: skip
        finally:
            self._client.close()

    def beat(self) -> None:
        """Write the record once (the thread does this every interval)."""
        import redis

        record = self.record
        record.load = self._load()
        record.heartbeat_at = time.time()
        try:
            previous = self._client.set(self._key, record.to_json(), px=int(record.ttl_s * 1000), get=True)
            if previous is None:
                self._announce("up")
        except redis.RedisError as exc:
            if self._reachable is not False:
                logger.warning(
                    "cannot reach the worker registry at %s (%s); serving on, retrying every %.1f s "
                    "(routers that know this worker keep it)",
                    redacted(self.url), exc, self.interval_s,
                )  # fmt: skip
            self._reachable = False
            return
        if self._reachable is not True:
            logger.info(
                "registered as %s worker %s at %s in %s (TTL %.0f s)",
                record.role, record.worker_id, record.address, redacted(self.url), record.ttl_s,
            )  # fmt: skip
        self._reachable = True
        self.num_beats += 1

    def _run(self) -> None:
        while True:
            try:
                self.beat()
            except Exception:  # a bug here must not end the heartbeat
                logger.exception("registry heartbeat failed")
            if self._stop.wait(self.interval_s):
                return

    def _announce(self, event: str) -> None:
        self._client.publish(CHANNEL, json.dumps({"event": event, "worker_id": self.record.worker_id}))

    def _holds_our_record(self) -> bool:
        """Whether the key still holds this worker's record (not a newer instance's)."""
        value = self._client.get(self._key)
        if value is None:
            return False
        try:
            theirs = WorkerRecord.from_json(value)
        except ValueError:
            return False
        return (theirs.engine_id, theirs.started_at) == (self.record.engine_id, self.record.started_at)
