"""Every worker the router knows: one WorkerClient each, their health, and their KV events.

Health follows the load reports (docs/disaggregation-flow.md): a worker is admitted at
its first report and taken out of routing after `worker_health_timeout_s` without one.
Silence alone may be a long engine step, so it fails nothing: the requests open there
go on, and when no worker of the role is healthy the orchestrator still uses one that
is connected (`routable`) rather than refuse. A closed connection is different: the
worker is gone, so its open requests fail (WorkerClient), its KV events are no longer
read and its prefix-index entries are dropped, so a dead worker never looks warm. When
it reports again it is admitted again and its event stream is read from scratch (the
subscriber replays what the worker still buffers), which rebuilds its entries. A report
from a new instance (its worker id or engine id changed: it restarted) does the same.

Besides the load, the router reads in each LoadReport (common/protocol.py):
- `kv_events_endpoint`, `kv_replay_endpoint`, `kv_events_topic`: where its KV events are
  published (a bind address such as tcp://*:5557 is read on the worker's own host);
- `block_size`, `prefix_caching_hash_algo`: how it hashes blocks, which the router must
  match (its own --block-size / --prefix-caching-hash-algo win when given).
Torch-free.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

import zmq.asyncio

from common.advertised_host import dialable_endpoint
from common.config.engine_config import DEFAULT_BLOCK_SIZE
from common.frame_auth import WORKER_CHANNEL, frame_auth
from common.protocol import LoadReport, WorkerRole
from router.config import DEFAULT_HASH_ALGO, RouterConfig
from router.kv_event_subscriber import KVEventSubscriber
from router.metrics import RouterMetrics
from router.prefix_index import PrefixIndex
from router.worker_client import WorkerClient
from router.worker_state import WorkerState

logger = logging.getLogger(__name__)

_MONITOR_INTERVAL_S = 0.2
_HELLO_RETRY_S = 1.0

EventFeed = tuple[str, str | None, str]  # (endpoint, replay endpoint, topic)


class WorkerPool:
    def __init__(self, config: RouterConfig, metrics: RouterMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.router_id = config.router_id or f"router-{uuid.uuid4().hex[:12]}"
        self.prefix_index = PrefixIndex()
        self.subscriber = KVEventSubscriber(self.prefix_index)
        self._ctx = zmq.asyncio.Context()
        self._auth = frame_auth(config.cluster_secret, WORKER_CHANNEL)
        self._clients: dict[str, WorkerClient] = {}
        for role, addresses in (
            (WorkerRole.PREFILL, config.prefill_workers),
            (WorkerRole.DECODE, config.decode_workers),
        ):
            for address in addresses:
                state = WorkerState(worker_id=address, role=role, address=address, healthy=False)
                self._clients[address] = WorkerClient(
                    state, self.router_id, self._ctx, self._on_load_report, self._on_disconnect, self._auth
                )
        self._feeds_wanted: dict[str, EventFeed] = {}  # what each worker's reports announce
        self._feeds_open: dict[str, EventFeed] = {}  # what the subscriber reads now
        self._learned_block_size: int | None = None
        self._learned_hash_algo: str | None = None
        self._warned_mismatch: set[str] = set()
        self._monitor: asyncio.Task[None] | None = None
        self.registry: Any = None  # router.registry_watcher.RegistryWatcher with --registry

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        self.subscriber.start()
        for client in list(self._clients.values()):
            await client.start()
        self._monitor = asyncio.create_task(self._watch(), name="worker-health")
        if self.config.registry:
            from router.registry_watcher import RegistryWatcher

            self.registry = RegistryWatcher(
                self.config.registry,
                self,
                static=[*self.config.prefill_workers, *self.config.decode_workers],
                poll_interval_s=self.config.registry_poll_interval_s,
            )
            await self.registry.start()

    async def close(self) -> None:
        if self.registry is not None:
            await self.registry.close()
            self.registry = None
        if self._monitor is not None:
            self._monitor.cancel()
            try:
                await self._monitor
            except asyncio.CancelledError:
                pass
            self._monitor = None
        for client in list(self._clients.values()):
            await client.close()
        await asyncio.to_thread(self.subscriber.close)
        self._ctx.term()

    # -- workers found while running (router/registry_watcher.py) -------------------------

    async def add_worker(self, address: str, role: WorkerRole) -> WorkerClient:
        """Connect to the worker at `address`; it is routed to once it reports its load."""
        client = self._clients.get(address)
        if client is not None:
            return client
        state = WorkerState(worker_id=address, role=role, address=address, healthy=False)
        client = WorkerClient(
            state, self.router_id, self._ctx, self._on_load_report, self._on_disconnect, self._auth
        )
        self._clients[address] = client
        await client.start()
        return client

    async def remove_worker(self, address: str, reason: str) -> None:
        """Forget the worker at `address`: its open requests fail with `reason`, its cached
        blocks leave the prefix index."""
        client = self._clients.pop(address, None)
        if client is None:
            return
        client.fail_streams(reason)
        self._feeds_wanted.pop(address, None)
        if self._feeds_open.pop(address, None) is not None:
            await asyncio.to_thread(self.subscriber.remove_worker, address)
        self.prefix_index.remove_worker(address)
        await client.close()

    # -- what the orchestrator and the routes read ---------------------------------------

    def clients(self, role: WorkerRole | None = None) -> list[WorkerClient]:
        return [c for c in self._clients.values() if role is None or c.state.role is role]

    def client(self, worker_id: str) -> WorkerClient:
        return self._clients[worker_id]

    def states(self, role: WorkerRole) -> list[WorkerState]:
        return [c.state for c in self.clients(role)]

    def num_healthy(self, role: WorkerRole) -> int:
        return sum(1 for c in self.clients(role) if c.state.healthy)

    def routable(self, role: WorkerRole) -> list[WorkerClient]:
        """The healthy workers of `role`; if none, the ones connected that reported before
        (silent for a while, most likely busy with a long step)."""
        healthy = [c for c in self.clients(role) if c.state.healthy]
        if healthy:
            return healthy
        return [c for c in self.clients(role) if c.connected and c.last_report is not None]

    @property
    def block_size(self) -> int:
        """The block size of the prompt hashes: --block-size, else the workers', else 16."""
        return self.config.block_size or self._learned_block_size or DEFAULT_BLOCK_SIZE

    @property
    def hash_algo(self) -> str:
        return self.config.prefix_caching_hash_algo or self._learned_hash_algo or DEFAULT_HASH_ALGO

    # -- load reports and health --------------------------------------------------------

    def _on_load_report(self, client: WorkerClient, report: LoadReport) -> None:
        state = client.state
        previous = client.last_report
        if previous is not None and (previous.worker_id, previous.engine_id) != (
            report.worker_id,
            report.engine_id,
        ):
            logger.warning(
                "worker %s restarted (now %s, engine %s); its open requests fail and its cache is re-read",
                state.worker_id, report.worker_id, report.engine_id,
            )  # fmt: skip
            client.fail_streams(f"worker {state.worker_id} restarted while the request was running on it")
            self._feeds_open.pop(state.worker_id, None)  # forces a fresh subscription
            self.prefix_index.remove_worker(state.worker_id)
        self._learn_hashing(state.worker_id, report)
        feed = _event_feed(state.address, report)
        if feed is not None:
            self._feeds_wanted[state.worker_id] = feed
        else:
            self._feeds_wanted.pop(state.worker_id, None)
        if not state.healthy:
            state.healthy = True
            logger.info("worker %s (%s) is up", state.worker_id, state.role.value)
            if self.metrics is not None:
                self.metrics.health_changes.labels(state.worker_id, state.role.value, "up").inc()

    def _mark_silent(self, client: WorkerClient, silent_s: float) -> None:
        state = client.state
        state.healthy = False
        logger.warning(
            "worker %s (%s) sent no load report for %.1f s; no new requests go there while it is silent",
            state.worker_id, state.role.value, silent_s,
        )  # fmt: skip
        if self.metrics is not None:
            self.metrics.health_changes.labels(state.worker_id, state.role.value, "down").inc()

    def _on_disconnect(self, client: WorkerClient) -> None:
        """The worker is gone (its open requests already failed): forget what it cached."""
        state = client.state
        if state.healthy and self.metrics is not None:
            self.metrics.health_changes.labels(state.worker_id, state.role.value, "down").inc()
        state.healthy = False
        self._feeds_wanted.pop(state.worker_id, None)
        self.prefix_index.remove_worker(state.worker_id)

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                now = time.monotonic()
                for client in self._clients.values():
                    state = client.state
                    silent = now - state.load_received_at
                    if state.healthy and silent > self.config.worker_health_timeout_s:
                        self._mark_silent(client, silent)
                    if (
                        not state.healthy
                        and client.connected
                        and loop.time() - client.hello_sent_at > _HELLO_RETRY_S
                    ):
                        client.send_hello()
                await self._sync_event_feeds()
            except Exception:  # the watch must go on whatever one round hits
                logger.exception("worker health round failed")
            await asyncio.sleep(_MONITOR_INTERVAL_S)

    async def _sync_event_feeds(self) -> None:
        """Read the KV events of every healthy worker that announces them, and only those."""
        wanted = {
            wid: feed
            for wid, feed in self._feeds_wanted.items()
            if wid in self._clients and self._clients[wid].state.healthy
        }
        for wid in [w for w in self._feeds_open if self._feeds_open[w] != wanted.get(w)]:
            del self._feeds_open[wid]
            await asyncio.to_thread(self.subscriber.remove_worker, wid)
        for wid, feed in wanted.items():
            if wid not in self._feeds_open:
                endpoint, replay, topic = feed
                try:
                    await asyncio.to_thread(self.subscriber.add_worker, wid, endpoint, replay, topic)
                except (ValueError, Exception) as exc:  # a bad address must not stop the others
                    logger.warning("cannot read the KV events of worker %s at %s: %s", wid, endpoint, exc)
                    self._feeds_wanted.pop(wid, None)
                    continue
                self._feeds_open[wid] = feed

    def _learn_hashing(self, worker_id: str, report: LoadReport) -> None:
        block_size = report.block_size
        algo = report.prefix_caching_hash_algo
        if block_size > 0:
            if self._learned_block_size is None:
                self._learned_block_size = block_size
            if block_size != self.block_size:
                self._warn_mismatch(worker_id, "block size", block_size, self.block_size, "--block-size")
        if algo:
            if self._learned_hash_algo is None:
                self._learned_hash_algo = algo
            if algo != self.hash_algo:
                self._warn_mismatch(
                    worker_id, "prefix-caching hash", algo, self.hash_algo, "--prefix-caching-hash-algo"
                )

    def _warn_mismatch(self, worker_id: str, what: str, theirs: Any, ours: Any, flag: str) -> None:
        if worker_id in self._warned_mismatch:
            return
        self._warned_mismatch.add(worker_id)
        logger.warning(
            "worker %s uses %s %s but the router hashes prompts with %s: prefix-aware routing "
            "will not find its cached blocks; give every worker and the router the same %s",
            worker_id, what, theirs, ours, flag,
        )  # fmt: skip


def _event_feed(worker_address: str, report: LoadReport) -> EventFeed | None:
    """Where the router reads the worker's KV events (a wildcard bind host is read on the
    host of the worker's own address); None when it publishes none."""
    endpoint, replay = report.kv_events_endpoint, report.kv_replay_endpoint
    if not endpoint:
        return None
    return (
        dialable_endpoint(endpoint, worker_address),
        dialable_endpoint(replay, worker_address) if replay else None,
        report.kv_events_topic,
    )
