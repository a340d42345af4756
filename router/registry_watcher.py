"""The router's side of the Redis worker registry (common/registry.py): find the workers.

Every `poll_interval_s`, and at once when a worker announces itself or its departure on
the registry channel, the watcher reads every worker record and brings the pool in line:
a new address is added (the pool connects and says hello; the worker is routed to once
it reports its load), an address whose record is gone is removed (its open requests
fail, its cached blocks leave the prefix index). Workers given on the command line
(--prefill-workers / --decode-workers) are never removed.

A record disappears when its worker stops cleanly (it deletes it: removed at once) or
dies (its TTL runs out: removed at the next read). Redis itself may go away: while it
cannot be read, the pool keeps the workers it last knew, and the watcher retries each
interval. A Redis that comes back (or restarted, which the watcher sees by its run id)
may have lost every record until the workers' next heartbeats, so for one TTL after
that no worker is removed for lacking a record. Several routers watch one registry side
by side; none of them owns it. Torch-free; imports `redis` when started.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from common.protocol import WorkerRole
from common.registry import CHANNEL, KEY_PREFIX, WorkerRecord, redacted

logger = logging.getLogger(__name__)

DEFAULT_POLL_INTERVAL_S = 1.0
_LISTEN_RETRY_S = 1.0


class Pool(Protocol):
    async def add_worker(self, address: str, role: WorkerRole) -> Any: ...
    async def remove_worker(self, address: str, reason: str) -> None: ...


class RegistryWatcher:
    def __init__(
        self,
        url: str,
        pool: Pool,
        *,
        static: Iterable[str] = (),
        poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
        client: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.pool = pool
        self.static = set(static)
        self.poll_interval_s = poll_interval_s
        if client is None:
            import redis.asyncio

            timeout = max(1.0, poll_interval_s)
            client = redis.asyncio.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self._client = client
        self._clock = clock
        self.records: dict[str, WorkerRecord] = {}  # address -> the record it was added by
        self._departed: set[str] = set()  # worker ids that announced they left
        self._grace_until = 0.0
        self._server_id: str | None = None
        self.reachable: bool | None = None  # None until the first read
        self._warned_bad: set[str] = set()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        # The loops also end on this flag: on Python 3.11, asyncio.wait_for and redis'
        # reads can swallow a cancellation that lands as they complete, and close() would
        # then wait on a loop that never ends.
        self._closing = False

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._poll(), name="registry-poll"),
            asyncio.create_task(self._listen(), name="registry-listen"),
        ]

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            # a loop that lost its cancellation ends at its next turn (one poll, or one
            # second of listening); cancel again meanwhile in case it is stuck in a read
            while True:
                _, pending = await asyncio.wait(self._tasks, timeout=_LISTEN_RETRY_S)
                if not pending:
                    break
                for task in pending:
                    task.cancel()
        for task in self._tasks:  # retrieved, so an error of a loop is not reported again at exit
            if not task.cancelled():
                task.exception()
        self._tasks = []
        try:
            await self._client.aclose()
        except Exception:  # closing a client of a Redis that is gone
            pass

    # -- one round ------------------------------------------------------------------------

    async def sync(self) -> None:
        """Read the registry and update the pool; a redis error when Redis cannot be read."""
        server_id, records = await self._read()
        now = self._clock()
        restarted = self._server_id is not None and server_id != self._server_id
        if self.reachable is False or restarted:
            # records may be missing until every worker's next heartbeat
            self._grace_until = now + max((r.ttl_s for r in self.records.values()), default=0.0)
            logger.info(
                "the worker registry at %s is %s; keeping the workers known for one TTL while they "
                "register again", redacted(self.url), "back after a restart" if restarted else "reachable again",
            )  # fmt: skip
        self._server_id = server_id
        self.reachable = True
        departed, self._departed = self._departed, set()

        wanted: dict[str, WorkerRecord] = {}
        for record in records:
            held = wanted.get(record.address)
            if held is None or record.started_at > held.started_at:  # the newest instance wins
                wanted[record.address] = record
        for address, record in wanted.items():
            if address in self.static:
                continue
            known = self.records.get(address)
            if known is not None and known.role != record.role:
                await self._remove(address, f"a {record.role} worker now registers at {address}")
            if address not in self.records:
                await self.pool.add_worker(address, WorkerRole(record.role))
                logger.info(
                    "registry: added %s worker %s at %s (engine %s, TP %d)",
                    record.role, record.worker_id, address, record.engine_id, record.tensor_parallel_size,
                )  # fmt: skip
            self.records[address] = record
        for address in [a for a in self.records if a not in wanted]:
            record = self.records[address]
            if record.worker_id in departed:
                await self._remove(address, f"worker {record.worker_id} left the registry (it stopped)")
            elif now >= self._grace_until:
                await self._remove(
                    address, f"the registry record of worker {record.worker_id} expired (no heartbeat for "
                    f"{record.ttl_s:g} s)"
                )  # fmt: skip

    async def _read(self) -> tuple[str | None, list[WorkerRecord]]:
        client = self._client
        info = await client.info("server")
        keys = [key async for key in client.scan_iter(match=KEY_PREFIX + "*", count=500)]
        values = await client.mget(keys) if keys else []
        records = []
        for key, value in zip(keys, values, strict=True):
            if value is None:  # expired between the scan and the read
                continue
            try:
                records.append(WorkerRecord.from_json(value))
            except ValueError as exc:
                name = key.decode(errors="replace") if isinstance(key, bytes) else str(key)
                if name not in self._warned_bad:
                    self._warned_bad.add(name)
                    logger.warning("registry: skipping the malformed record %s: %s", name, exc)
        return info.get("run_id"), records

    async def _remove(self, address: str, reason: str) -> None:
        self.records.pop(address, None)
        logger.info("registry: removed the worker at %s: %s", address, reason)
        await self.pool.remove_worker(address, reason)

    # -- the loops ------------------------------------------------------------------------

    async def _poll(self) -> None:
        while not self._closing:
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # redis errors, OSError, a timeout: Redis is not there
                if self.reachable is not False:
                    logger.warning(
                        "cannot read the worker registry at %s (%s: %s); keeping the %d workers known, "
                        "retrying every %.1f s",
                        redacted(self.url), type(exc).__name__, exc, len(self.records), self.poll_interval_s,
                    )  # fmt: skip
                self.reachable = False
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_interval_s)
            except asyncio.TimeoutError:  # noqa: UP041 - not the builtin before Python 3.11
                pass
            self._wake.clear()

    async def _listen(self) -> None:
        """Wake the poll when a worker joins or leaves; resubscribe after a lost connection."""
        while not self._closing:
            pubsub = self._client.pubsub()
            try:
                await pubsub.subscribe(CHANNEL)
                while not self._closing:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None:
                        self._take_announcement(message.get("data"))
            except asyncio.CancelledError:
                raise
            except Exception:  # the poll reports Redis being away; here just try again
                await asyncio.sleep(_LISTEN_RETRY_S)
            finally:
                try:
                    await pubsub.aclose()
                except Exception:
                    pass

    def _take_announcement(self, data: Any) -> None:
        try:
            event = json.loads(data)
        except (TypeError, ValueError):
            return
        if not isinstance(event, dict):
            return
        worker_id = event.get("worker_id")
        if event.get("event") == "down" and isinstance(worker_id, str):
            self._departed.add(worker_id)
        self._wake.set()
