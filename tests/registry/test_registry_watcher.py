"""The router's registry watcher against a real redis-server and real heartbeats: workers
are added when they register, removed when their record expires or they leave, kept
while Redis is down, and kept across a Redis restart while they register again."""

from __future__ import annotations

import asyncio
import time

from common.protocol import WorkerRole
from common.registry import WorkerRecord, worker_key
from common.registry_heartbeat import RegistryHeartbeat
from router.registry_watcher import RegistryWatcher

POLL_S = 0.1


class RecordingPool:
    """The two calls the watcher makes on the router's WorkerPool, written down."""

    def __init__(self) -> None:
        self.workers: dict[str, WorkerRole] = {}
        self.removed: list[tuple[str, str]] = []

    async def add_worker(self, address: str, role: WorkerRole) -> None:
        assert address not in self.workers, f"{address} added twice"
        self.workers[address] = role

    async def remove_worker(self, address: str, reason: str) -> None:
        del self.workers[address]
        self.removed.append((address, reason))


def heartbeat(url: str, worker_id: str, role: str = "decode", port: int = 8200, ttl_s: float = 1.0):
    record = WorkerRecord(
        worker_id=worker_id, role=role, address=f"tcp://127.0.0.1:{port}", model="m",
        engine_id=f"engine-{worker_id}", ttl_s=ttl_s,
    )  # fmt: skip
    beat = RegistryHeartbeat(url, record)
    beat.start()
    return beat


def die(beat: RegistryHeartbeat) -> None:
    """The worker is killed: its heartbeat stops without a goodbye."""
    beat._stop.set()
    beat._thread.join(5)


async def until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s} s"
        await asyncio.sleep(0.02)


async def watching(url: str, pool: RecordingPool, **kwargs) -> RegistryWatcher:
    watcher = RegistryWatcher(url, pool, poll_interval_s=POLL_S, **kwargs)
    await watcher.start()
    return watcher


def test_workers_join_the_pool_when_they_register_and_leave_when_their_record_expires(redis_server):
    async def scenario():
        pool = RecordingPool()
        watcher = await watching(redis_server.url, pool)
        prefill = heartbeat(redis_server.url, "prefill-1", role="prefill", port=8100)
        decode = heartbeat(redis_server.url, "decode-1", port=8200)
        try:
            await until(lambda: len(pool.workers) == 2, 5, "both workers joining")
            assert pool.workers == {
                "tcp://127.0.0.1:8100": WorkerRole.PREFILL,
                "tcp://127.0.0.1:8200": WorkerRole.DECODE,
            }
            die(decode)
            await until(lambda: pool.removed, 5, "the dead worker's removal")
            (address, reason), *_ = pool.removed
            assert address == "tcp://127.0.0.1:8200" and "expired" in reason
            assert list(pool.workers) == ["tcp://127.0.0.1:8100"]
        finally:
            prefill.close()
            await watcher.close()

    asyncio.run(scenario())


def test_a_worker_that_stops_cleanly_leaves_at_once(redis_server):
    async def scenario():
        pool = RecordingPool()
        # a long poll interval: only the departure announcement can make it prompt
        watcher = RegistryWatcher(redis_server.url, pool, poll_interval_s=30.0)
        await watcher.start()
        beat = heartbeat(redis_server.url, "decode-1", ttl_s=30.0)
        try:
            await until(lambda: pool.workers, 5, "the worker joining (announced)")
            await asyncio.to_thread(beat.close)
            await until(lambda: not pool.workers, 5, "the worker leaving (announced)")
            assert "left the registry" in pool.removed[0][1]
        finally:
            await watcher.close()

    asyncio.run(scenario())


def test_command_line_workers_are_never_removed(redis_server):
    async def scenario():
        pool = RecordingPool()
        static = "tcp://127.0.0.1:8200"
        watcher = await watching(redis_server.url, pool, static=[static])
        beat = heartbeat(redis_server.url, "decode-1", port=8200)
        try:
            await asyncio.sleep(10 * POLL_S)
            die(beat)
            await asyncio.sleep(1.0 + 10 * POLL_S)
            assert pool.workers == {} and pool.removed == []  # the pool holds it already, untouched
        finally:
            await watcher.close()

    asyncio.run(scenario())


def test_the_known_workers_stay_while_redis_is_down_and_across_its_restart(redis_server):
    async def scenario():
        pool = RecordingPool()
        watcher = await watching(redis_server.url, pool)
        beat = heartbeat(redis_server.url, "decode-1", ttl_s=2.0)
        try:
            await until(lambda: pool.workers, 5, "the worker joining")
            await asyncio.to_thread(redis_server.stop)
            await until(lambda: watcher.reachable is False, 5, "the watcher noticing Redis is gone")
            await asyncio.sleep(2.5)  # longer than the TTL: still kept, nothing can be read
            assert list(pool.workers) == ["tcp://127.0.0.1:8200"] and pool.removed == []

            await asyncio.to_thread(redis_server.start)  # a fresh Redis: every record is lost
            await until(lambda: watcher.reachable, 5, "the watcher reading Redis again")
            client = redis_server.client()
            try:
                await until(lambda: client.exists(worker_key("decode-1")), 5, "the worker registering again")
            finally:
                client.close()
            await asyncio.sleep(2.5)  # past the grace period: the worker is registered, so it stays
            assert list(pool.workers) == ["tcp://127.0.0.1:8200"] and pool.removed == []

            # and the watch works again: a new worker joins, a dead one leaves
            second = heartbeat(redis_server.url, "decode-2", port=8201)
            await until(lambda: len(pool.workers) == 2, 5, "a new worker joining after the restart")
            die(second)
            await until(lambda: len(pool.workers) == 1, 5, "the new worker's removal after it died")
        finally:
            beat.close()
            await watcher.close()

    asyncio.run(scenario())


def test_a_worker_missing_after_a_restart_is_removed_once_the_grace_ends(redis_server):
    async def scenario():
        pool = RecordingPool()
        watcher = await watching(redis_server.url, pool)
        beat = heartbeat(redis_server.url, "decode-1", ttl_s=1.0)
        try:
            await until(lambda: pool.workers, 5, "the worker joining")
            die(beat)  # it dies while Redis is away, so it never registers again
            await asyncio.to_thread(redis_server.stop)
            await until(lambda: watcher.reachable is False, 5, "the watcher noticing Redis is gone")
            await asyncio.to_thread(redis_server.start)
            await until(lambda: watcher.reachable, 5, "the watcher reading Redis again")
            assert pool.workers  # within the grace period: kept
            await until(lambda: not pool.workers, 3, "the removal after the grace period")
        finally:
            await watcher.close()

    asyncio.run(scenario())


def test_a_malformed_record_is_skipped_and_the_others_still_join(redis_server):
    async def scenario():
        client = redis_server.client()
        client.set(worker_key("junk"), b"\x80 not json")
        client.set(
            worker_key("bad-role"), WorkerRecord("bad-role", "router", "tcp://h:1", "m", "e", 5).to_json()
        )
        pool = RecordingPool()
        watcher = await watching(redis_server.url, pool)
        beat = heartbeat(redis_server.url, "decode-1")
        try:
            await until(lambda: pool.workers, 5, "the good worker joining")
            await asyncio.sleep(5 * POLL_S)
            assert list(pool.workers) == ["tcp://127.0.0.1:8200"]
        finally:
            beat.close()
            await watcher.close()
            client.close()

    asyncio.run(scenario())
