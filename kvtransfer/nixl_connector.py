"""NixlConnector: KV blocks by NIXL READs (UCX), on host memory ("DRAM") or GPU memory
("VRAM") alike, and by a direct device copy between engines of one machine.

Both sides register their whole KV tensor with a NIXL agent. The producer announces
in the side-channel handshake its agent metadata, the cache's base address and its
block length, all as plain msgpack fields; the consumer loads the metadata, builds the
descriptor list of the producer's blocks itself (one descriptor per block: a block is
one contiguous region) and READs only the blocks it lacks. NIXL's own descriptor
serialization is pickle and never crosses the wire. The READ carries the notification
"<remote_request_id>:<tp_size>", by which the producer learns that the blocks are free.

All NIXL calls of the consumer run in its I/O thread, which also drives the transfers'
progress while any are in flight; the producer's side-channel thread reads the
notifications (and so drives the target side's progress) while blocks are leased. The
agent runs in strict thread-sync mode, since a kv_both connector uses it from both
threads.

On one machine a NIXL READ carries a fixed cost per transfer that dominates a
request-sized pull (on one GPU, UCX serves READs between processes over TCP unless its
cuda_ipc GET is forced on, and even then reaches a fraction of a device copy). So the
producer also announces its cache for direct copies (kvtransfer/direct_export.py, the
handshake's `cuda_ipc` field), and a consumer whose cache and the producer's are both on
CUDA on the same machine, or which runs in the producer's process, copies the blocks
directly instead, as CudaIpcConnector does (kvtransfer/direct_copy.py), and releases
the producer's lease with the side channel's "done" notice, since no READ notification
comes. Every other pull (another machine, a host-memory cache, a handle that does not
map) is a NIXL READ. The consumer logs once per producer which path its pulls take.

kv_connector_extra_config keys read here (besides SideChannelConnector's):
    backends            NIXL backends to create (["UCX"])
    num_threads         backend worker threads (0: the backend's default)
    enable_prog_thread  NIXL's progress thread (false: it spins a core while idle;
                        the I/O thread drives progress instead)
    same_host_copy      "auto" (default): direct copies where the route allows, as above;
                        "off": a consumer always READs, and a producer announces no cache
                        for direct copies
"""

from __future__ import annotations

import functools
import importlib
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from kvtransfer.connector import ConnectorUnavailableError
from kvtransfer.direct_copy import CountsDirectCopies, DirectCopier, DirectSource
from kvtransfer.direct_export import DirectExport
from kvtransfer.kv_consumer import KVConsumer, Pull, RemoteEngine
from kvtransfer.kv_region import KVRegion
from kvtransfer.peer_link import Peer
from kvtransfer.side_channel import NixlAgentInfo
from kvtransfer.side_channel_connector import SideChannelConnector

logger = logging.getLogger(__name__)

# `nixl` is the meta package (it picks a CUDA flavour); the flavoured wheels install
# under their own names.
NIXL_API_MODULES = ("nixl._api", "nixl_cu12._api", "nixl_cu13._api")
IN_FLIGHT_POLL_S = 0.001
SAME_HOST_COPY_MODES = ("auto", "off")


@functools.cache
def import_nixl_api() -> ModuleType:
    errors = []
    for name in NIXL_API_MODULES:
        try:
            return importlib.import_module(name)
        except (ImportError, OSError) as e:
            errors.append(f"{name}: {e}")
    raise ConnectorUnavailableError(
        "NixlConnector needs the NIXL Python package, which does not import here "
        f"({'; '.join(errors)}); install it with `pip install nixl-cu12` (or `pip install nixl`), "
        'or set "kv_connector": "TcpConnector"'
    )


def nixl_available() -> bool:
    try:
        import_nixl_api()
    except ConnectorUnavailableError:
        return False
    return True


def notification_request_id(message: bytes) -> str | None:
    """The request id in a "<request_id>:<tp_size>" notification, or None if malformed."""
    try:
        text = message.decode("utf-8")
    except UnicodeDecodeError:
        return None
    request_id, sep, tp_size = text.rpartition(":")
    if not sep or not tp_size.isdigit() or not request_id:
        return None
    return request_id


@dataclass
class _Read:
    handle: Any  # NIXL's transfer handle
    cancel_failed: bool = False


@dataclass
class _RemoteAgent:
    name: str
    blocks: Any  # the prepared descriptor list of all the producer's blocks


class NixlConsumer(CountsDirectCopies, KVConsumer):
    def __init__(self, *, agent: Any, same_host_copy: bool = True, **kwargs: Any) -> None:
        """same_host_copy: copy directly from producers on this machine where the route allows."""
        self._agent = agent
        self._same_host_copy = same_host_copy
        self._copier: DirectCopier | None = None
        self._local_blocks: Any = None
        self._remote_agents: dict[str, _RemoteAgent] = {}
        self._in_flight: dict[str, Pull] = {}
        self._unreleased: list[Any] = []  # handles NIXL could not release yet
        super().__init__(**kwargs)

    def _on_register(self, region: KVRegion) -> None:
        self._local_blocks = self._agent.prep_xfer_dlist(
            "NIXL_INIT_AGENT", region.block_addresses(), region.mem_type
        )
        if self._same_host_copy:
            self._copier = DirectCopier(region, fallback="by NIXL READ")

    def _accept_engine(self, engine: RemoteEngine) -> DirectSource | _RemoteAgent:
        reply = engine.reply
        if self._copier is not None:
            source = self._copier.accept(engine)  # logs the path it chose
            if source is not None:
                return source
        info = reply.nixl
        if info is None:
            raise ValueError(
                f"engine {reply.engine_id} runs {reply.connector}, which offers no NIXL agent; "
                "run NixlConnector on both sides, or TcpConnector on this one"
            )
        known = self._remote_agents.get(info.agent_name)
        if known is not None:  # the same producer process, seen again after a reconnect
            return known
        loaded = self._agent.add_remote_agent(info.agent_metadata)
        loaded = loaded.decode() if isinstance(loaded, bytes) else str(loaded)
        if loaded != info.agent_name:
            self._agent.remove_remote_agent(loaded)
            raise ValueError(
                f"the producer's NIXL metadata names agent {loaded!r}, its handshake {info.agent_name!r}"
            )
        rows = np.empty((reply.num_blocks, 3), dtype=np.uint64)
        rows[:, 0] = info.base_addr + np.arange(reply.num_blocks, dtype=np.uint64) * reply.block_len
        rows[:, 1] = reply.block_len
        rows[:, 2] = info.device_id
        remote = _RemoteAgent(
            info.agent_name, self._agent.prep_xfer_dlist(info.agent_name, rows, info.mem_type)
        )
        self._remote_agents[info.agent_name] = remote
        logger.info("loaded NIXL agent %s of engine %s", info.agent_name, reply.engine_id)
        if self._copier is None:
            logger.info(
                "pulls from engine %s go by NIXL READ: kv_connector_extra_config.same_host_copy is off",
                reply.engine_id,
            )
        return remote

    def _transfer(self, pull: Pull, engine: RemoteEngine) -> None:
        if isinstance(engine.transfer, DirectSource):
            error = self._copier.copy(engine.transfer, pull)
            if error is not None:
                self._fail(pull, error)
                return
            # no READ, so no notification: the side channel's "done" releases the lease
            self._succeed(pull, num_bytes=len(pull.local_ids) * self.region.block_len, notify=True)
            return
        notification = f"{pull.remote.request_id}:{self.tp_size}".encode()
        handle = self._agent.make_prepped_xfer(
            "READ", self._local_blocks, pull.local_ids, engine.transfer.blocks, pull.remote_ids, notification
        )
        if self._agent.transfer(handle) == "ERR":
            self._release(handle)
            raise RuntimeError("NIXL could not post the READ")
        pull.transfer = _Read(handle)
        self._in_flight[pull.request_id] = pull

    def _tick_transfers(self) -> float | None:
        if self._unreleased:
            handles, self._unreleased = self._unreleased, []
            for handle in handles:
                self._release(handle)
        for request_id, pull in list(self._in_flight.items()):
            state = self._agent.check_xfer_state(pull.transfer.handle)
            if state == "PROC":
                continue
            del self._in_flight[request_id]
            self._release(pull.transfer.handle)
            if state == "DONE":
                self._succeed(pull, num_bytes=len(pull.local_ids) * self.region.block_len, notify=False)
            else:
                self._fail(pull, "NIXL reported the READ failed (is the producer still running?)")
        return IN_FLIGHT_POLL_S if self._in_flight or self._unreleased else None

    def _cancel(self, pull: Pull) -> bool:
        if pull.request_id not in self._in_flight:
            return True
        read: _Read = pull.transfer
        try:
            read.handle.release()  # cancels a READ in progress, or raises if it cannot
        except Exception as e:
            if not read.cancel_failed:
                read.cancel_failed = True
                logger.warning(
                    "cannot cancel the NIXL READ of request %s (%s); its local blocks stay busy "
                    "until it ends",
                    pull.request_id,
                    e,
                )
            return False
        del self._in_flight[pull.request_id]
        return True

    def _lost_peer(self, peer: Peer) -> None:
        if self._copier is not None:
            self._copier.lost_peer(peer)
        for pull in [p for p in self._in_flight.values() if p.remote.peer == peer]:
            if self._cancel(pull):
                self._fail(pull, f"lost the side channel to the producer at {peer[0]}:{peer[1]}")

    def _release(self, handle: Any) -> None:
        try:
            handle.release()
        except Exception:
            self._unreleased.append(handle)

    def _on_close(self) -> None:
        if self._copier is not None:
            self._copier.close()
        for pull in self._in_flight.values():
            try:
                pull.transfer.handle.release()
            except Exception:
                logger.warning("a NIXL READ of request %s was still running at close", pull.request_id)
        self._in_flight.clear()
        for remote in self._remote_agents.values():
            remote.blocks.release()
            try:
                self._agent.remove_remote_agent(remote.name)
            except Exception:
                pass
        self._remote_agents.clear()
        if self._local_blocks is not None:
            self._local_blocks.release()
            self._local_blocks = None


class NixlConnector(SideChannelConnector):
    name = "NixlConnector"

    def _setup(self) -> None:
        api = import_nixl_api()
        extra = self.config.kv_connector_extra_config
        backends = extra.get("backends", ["UCX"])
        if not isinstance(backends, list) or not backends or not all(isinstance(b, str) for b in backends):
            raise ValueError(
                f'kv_connector_extra_config.backends must be a list of names like ["UCX"], got {backends!r}'
            )
        num_threads = extra.get("num_threads", 0)
        if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 0:
            raise ValueError(
                f"kv_connector_extra_config.num_threads must be an integer >= 0, got {num_threads!r}"
            )
        progress_thread = extra.get("enable_prog_thread", False)
        if not isinstance(progress_thread, bool):
            raise ValueError(
                f"kv_connector_extra_config.enable_prog_thread must be true or false, got {progress_thread!r}"
            )
        same_host_copy = extra.get("same_host_copy", "auto")
        if not isinstance(same_host_copy, str) or same_host_copy not in SAME_HOST_COPY_MODES:
            raise ValueError(
                f'kv_connector_extra_config.same_host_copy must be "auto" or "off", got {same_host_copy!r}'
            )
        self.same_host_copy = same_host_copy == "auto"
        self._direct_export: DirectExport | None = None
        # a new name at every start: a consumer must never mistake a restarted producer for the old one
        self.agent_name = f"{self.config.engine_id}-rank{self.tp_rank}-{uuid.uuid4().hex[:12]}"
        self._agent = api.nixl_agent(
            self.agent_name,
            api.nixl_agent_config(
                enable_prog_thread=progress_thread,
                backends=backends,
                num_threads=num_threads,
                sync_mode=api.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT,
            ),
        )
        if not self._agent.backends:
            raise ConnectorUnavailableError(
                f"none of the NIXL backends {backends} could be created here (available plugins: "
                f"{', '.join(self._agent.get_plugin_list()) or 'none'}); check the NIXL install"
            )
        self._registered: Any = None
        super()._setup()

    def _make_consumer(self) -> KVConsumer:
        return NixlConsumer(agent=self._agent, same_host_copy=self.same_host_copy, **self._consumer_kwargs())

    def _register_memory(self, region: KVRegion) -> dict[str, Any]:
        self._registered = self._agent.register_memory(region.tensor)
        if not self.is_producer:
            return {}
        info = NixlAgentInfo(
            agent_name=self.agent_name,
            agent_metadata=self._agent.get_agent_metadata(),
            base_addr=region.base_addr,
            device_id=region.device_id,
            mem_type=region.mem_type,
        )
        if not self.same_host_copy:
            return {"nixl": info}
        self._direct_export = DirectExport(self._producer.instance_id, region, fallback="by NIXL READ")
        return {"nixl": info, "cuda_ipc": self._direct_export.to_message()}

    def _notification_source(self) -> Callable[[], list[str]]:
        return self._released_by_notification

    def _released_by_notification(self) -> list[str]:
        """Request ids from READ notifications; runs in the producer's side-channel thread."""
        released = []
        for agent_name, messages in self._agent.get_new_notifs().items():
            for message in messages:
                request_id = notification_request_id(message)
                if request_id is None:
                    logger.warning(
                        "ignored a malformed NIXL notification from %s: %r", agent_name, message[:80]
                    )
                else:
                    released.append(request_id)
        return released

    def close(self) -> None:
        if self._direct_export is not None:
            self._direct_export.close()
            self._direct_export = None
        super().close()
        if self._registered is not None:
            self._agent.deregister_memory(self._registered)
            self._registered = None
