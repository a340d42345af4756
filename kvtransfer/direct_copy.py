"""Pulls that copy a producer's KV cache directly, for a consumer on the producer's machine.

A consumer (CudaIpcConsumer, NixlConsumer) holds one DirectCopier over its own cache.
At each handshake the copier reads the producer's `cuda_ipc` announcement
(kvtransfer/direct_export.py) and picks the route (`choose_route`): a producer in this
very process is read straight from its tensor; one in another process on this machine,
both caches on CUDA, is mapped once through its CUDA IPC handle and the mapping kept.
Anything else, or a handle that does not map, leaves the producer to the connector's own
path; the copier logs once per producer which path its pulls take and why.

A pull is then one gather-scatter copy over all the requested blocks (dst[local_ids] =
src[remote_ids], kvtransfer/cuda_ipc_copy.py) on the consumer's copy stream, replayed as
a CUDA graph where Triton is present, and a wait on its event. The copy runs in the
consumer's I/O thread, which waits for it (a few hundred microseconds for a 2k-token
request of an 8B model), so the worker's step loop never blocks. The producer's KV for a
request is complete before its kv_transfer_params exist (the prefill step read its
sampled token back to the host), so the copy needs no cross-process stream ordering. The
consumer then releases the producer's lease with the side channel's "done" notice.

A mapping keeps the producer's allocation alive; the copier unmaps it when the side
channel to that producer breaks, when the same engine comes back as a new instance, and
at close.

Environment (for comparing variants in the transfer benchmark):
    PDSERVE_KV_COPY_GRAPHS=0     launch each copy from Python instead of a CUDA graph
    PDSERVE_KV_COPY_WAIT=block   wait for a copy's event asleep instead of spinning
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvtransfer.cuda_ipc_copy import GraphedBlockCopy, copy_blocks, triton_available
from kvtransfer.cuda_ipc_driver import CudaDriver, DeviceBytes, MappedAllocation, cuda_driver
from kvtransfer.cuda_ipc_export import (
    ROUTE_IPC,
    ROUTE_SAME_PROCESS,
    CudaIpcExport,
    LocalEnd,
    choose_route,
)
from kvtransfer.direct_export import local_producer
from kvtransfer.kv_consumer import Pull, RemoteEngine
from kvtransfer.kv_region import KVRegion
from kvtransfer.peer_link import Peer
from kvtransfer.side_channel import MessageError

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class DirectSource:
    """A producer's cache as this process sees it: [num_blocks, block_len] bytes."""

    route: str  # ROUTE_IPC or ROUTE_SAME_PROCESS
    peer: Peer
    engine_id: str
    instance_id: str
    blocks: torch.Tensor | None
    mapping: MappedAllocation | None = None  # the IPC mapping to undo when done
    closed: bool = False


class DirectCopier:
    """Direct copies into one consumer's cache. Built when the cache is registered; every
    other call comes from the consumer's I/O thread. `fallback` says, for the log, how
    pulls go when they cannot copy directly ("by NIXL READ")."""

    def __init__(self, region: KVRegion, *, fallback: str, driver: CudaDriver | None = None) -> None:
        self.region = region
        self.fallback = fallback
        self._driver = driver
        self._local = LocalEnd.here("cuda" if region.is_cuda else "cpu")
        self._stream: torch.cuda.Stream | None = None
        self._graphed: GraphedBlockCopy | None = None
        if region.is_cuda:
            self._stream = torch.cuda.Stream(region.tensor.device)
            if triton_available() and _graphs_wanted():
                self._graphed = GraphedBlockCopy(region.blocks, self._stream, blocking_wait=_blocking_wait())
        self._sources: dict[str, DirectSource] = {}  # by producer instance id
        self.num_copies = 0

    # -- choosing the path, once per producer instance ------------------------------------

    def accept(self, engine: RemoteEngine) -> DirectSource | None:
        """The source to copy `engine`'s blocks from, or None: pull them the fallback way."""
        reply = engine.reply
        known = self._sources.get(reply.instance_id)
        if known is not None and not known.closed:
            return known
        export = None
        if reply.cuda_ipc is not None:
            try:
                export = CudaIpcExport.from_message(reply.cuda_ipc)
                export.check_extent(reply.num_blocks, reply.block_len)
            except MessageError as e:
                logger.warning("engine %s sent an unusable CUDA IPC export (%s)", reply.engine_id, e)
                export = None
        route, why = choose_route(export, self._local)
        source = None
        try:
            if route == ROUTE_SAME_PROCESS:
                source, why = self._same_process_source(engine, export)
            elif route == ROUTE_IPC:
                source = self._map(engine, export)
        except Exception as e:
            why = f"mapping its CUDA IPC handle failed ({type(e).__name__}: {e})"
        if source is None:
            logger.info("pulls from engine %s go %s: %s", reply.engine_id, self.fallback, why)
            return None
        self._retire(lambda s: s.engine_id == reply.engine_id)  # an older instance of that engine
        self._sources[reply.instance_id] = source
        logger.info(
            "pulls from engine %s copy its KV cache directly (%s: %s)", reply.engine_id, source.route, why
        )
        return source

    def _same_process_source(
        self, engine: RemoteEngine, export: CudaIpcExport
    ) -> tuple[DirectSource | None, str]:
        reply = engine.reply
        region = local_producer(reply.instance_id)
        if region is None or region.base_addr != export.base_addr:
            return None, "it claims to run in this process, but no producer here matches it"
        if (region.num_blocks, region.block_len) != (reply.num_blocks, reply.block_len):
            return None, "its handshake does not describe its cache in this process"
        if region.tensor.device.type != self.region.tensor.device.type:
            return None, "its cache and this one are on different kinds of device"
        source = DirectSource(
            ROUTE_SAME_PROCESS, engine.peer, reply.engine_id, reply.instance_id, region.blocks
        )
        return source, "the producer runs in this process"

    def _map(self, engine: RemoteEngine, export: CudaIpcExport) -> DirectSource:
        reply = engine.reply
        driver = self._driver or cuda_driver()
        device = self.region.tensor.device
        mapping = driver.open(export.handle, device.index or 0)
        extent = reply.num_blocks * reply.block_len
        if export.offset + extent > mapping.size:
            driver.close(mapping)
            raise ValueError(
                f"the producer's cache ({extent} bytes at offset {export.offset}) does not fit the "
                f"{mapping.size}-byte allocation its handle maps"
            )
        flat = torch.as_tensor(
            DeviceBytes(mapping.base + export.offset, extent, owner=mapping), device=device
        )
        blocks = flat.view(reply.num_blocks, reply.block_len)
        return DirectSource(ROUTE_IPC, engine.peer, reply.engine_id, reply.instance_id, blocks, mapping)

    # -- moving the bytes -------------------------------------------------------------------

    def copy(self, source: DirectSource, pull: Pull) -> str | None:
        """Copy the pull's blocks and wait for them; None once they landed, else why not.
        Stamps the copy's phases into pull.phases_ns."""
        if pull.phases_ns is None:
            pull.phases_ns = {}
        phases = pull.phases_ns
        phases["started"] = time.perf_counter_ns()
        if source.closed:
            return "the mapping of the producer's cache was dropped (it restarted or went away)"
        if self._graphed is not None:
            self._graphed.copy(source.blocks, pull.remote_ids, pull.local_ids, phases)
            gpu_s = self._graphed.wait()
            phases["gpu_done"] = time.perf_counter_ns()
            phases["gpu_ns"] = round(gpu_s * 1e9)
        else:
            self._copy_without_graph(source, pull, phases)
        self.num_copies += 1
        phases["recorded"] = time.perf_counter_ns()
        return None

    def _copy_without_graph(self, source: DirectSource, pull: Pull, phases: dict[str, int]) -> None:
        """One Triton launch from Python (or torch's gather on CPU), then a wait on an event."""
        stream = self._stream
        if stream is None:
            copy_blocks(source.blocks, self.region.blocks, pull.remote_ids, pull.local_ids)
            return
        with torch.cuda.stream(stream):
            begin = torch.cuda.Event(enable_timing=True)
            done = torch.cuda.Event(enable_timing=True, blocking=_blocking_wait())
            begin.record(stream)
            copy_blocks(source.blocks, self.region.blocks, pull.remote_ids, pull.local_ids)
            phases["launched"] = time.perf_counter_ns()
            done.record(stream)
            done.synchronize()
        phases["gpu_done"] = time.perf_counter_ns()
        phases["gpu_ns"] = round(begin.elapsed_time(done) * 1e6)

    # -- letting go ------------------------------------------------------------------------

    def lost_peer(self, peer: Peer) -> None:
        """The side channel to `peer` broke: unmap its cache (a new handshake maps it again).
        No copy is in flight then: each ends inside copy()."""
        self._retire(lambda s: s.peer == peer)

    def close(self) -> None:
        self._retire(lambda _source: True)

    def _retire(self, matches: Callable[[DirectSource], bool]) -> None:
        for instance_id, source in list(self._sources.items()):
            if matches(source):
                del self._sources[instance_id]
                self._unmap(source)

    def _unmap(self, source: DirectSource) -> None:
        source.closed = True
        if self._graphed is not None:
            self._graphed.forget(source.blocks)
        source.blocks = None
        if source.mapping is not None:
            try:
                (self._driver or cuda_driver()).close(source.mapping)
            except Exception as e:
                logger.warning("unmapping engine %s's KV cache failed: %s", source.engine_id, e)


def _blocking_wait() -> bool:
    """Wait for a copy's event asleep (PDSERVE_KV_COPY_WAIT=block) instead of spinning."""
    return os.environ.get("PDSERVE_KV_COPY_WAIT", "spin") == "block"


def _graphs_wanted() -> bool:
    """CUDA graphs for the copies unless PDSERVE_KV_COPY_GRAPHS=0 (for comparing the two)."""
    return os.environ.get("PDSERVE_KV_COPY_GRAPHS", "1") != "0"


class CountsDirectCopies:
    """Mixed into a KVConsumer that holds a DirectCopier as `_copier`: its stats() report how
    many pulls the direct copy served (benchmarks tell the paths apart by it)."""

    _copier: DirectCopier | None = None

    @property
    def num_direct_transfers(self) -> int:
        return 0 if self._copier is None else self._copier.num_copies

    def stats(self) -> dict[str, float]:
        return {**super().stats(), "num_direct_transfers": self.num_direct_transfers}  # type: ignore[misc]
