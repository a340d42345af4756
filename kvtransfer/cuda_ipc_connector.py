"""CudaIpcConnector: KV blocks between engines on one machine at device speed.

The producer exports its whole KV-cache allocation once, as a CUDA IPC handle, and
announces it in the side-channel handshake (kvtransfer/cuda_ipc_export.py: plain msgpack
fields). A consumer on the same machine maps that allocation once per producer instance
and keeps the mapping; a pull is then one gather-scatter kernel launch over all the
requested blocks (dst[local_ids] = src[remote_ids], kvtransfer/cuda_ipc_copy.py) on the
consumer's copy stream, an event sync, and the usual "done" notice that releases the
producer's lease. A producer in the same process (tests, in-process benchmarks) is read
straight from its tensor.

Where the direct path cannot work (the producer is on another machine, either cache is
in host memory, the producer runs another connector, or the handle does not map) the
consumer falls back, per producer, to the side channel's block reads, exactly as
TcpConnector does, and logs why once. So one configuration serves a single-node
deployment at device speed and still works elsewhere; for multi-node deployments that
need speed across machines, use NixlConnector.

The copy runs in the consumer's I/O thread, which waits for its event (a few hundred
microseconds for a 2k-token request of an 8B model), so the worker's step loop never
blocks. The producer's KV for a request is complete before its kv_transfer_params
exist (the prefill step read its sampled token back to the host), so the copy needs no
cross-process stream ordering.

A mapping keeps the producer's allocation alive; the consumer unmaps it when the side
channel to that producer breaks, when the same engine comes back as a new instance, and
at close.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from kvtransfer.cuda_ipc_copy import GraphedBlockCopy, copy_blocks, triton_available
from kvtransfer.cuda_ipc_driver import CudaDriver, DeviceBytes, MappedAllocation, cuda_driver
from kvtransfer.cuda_ipc_export import (
    ROUTE_IPC,
    ROUTE_SAME_PROCESS,
    CudaIpcExport,
    LocalEnd,
    choose_route,
    this_host_id,
)
from kvtransfer.kv_consumer import Pull, RemoteEngine
from kvtransfer.kv_region import KVRegion
from kvtransfer.peer_link import Peer
from kvtransfer.side_channel import HandshakeReply, MessageError
from kvtransfer.tcp_connector import TcpConnector, TcpConsumer

logger = logging.getLogger(__name__)

# Producers of this process by instance id: the only regions a same-process pull may read,
# so a peer claiming to be this process cannot point the consumer at arbitrary memory.
_local_producers: dict[str, KVRegion] = {}
_local_producers_lock = threading.Lock()


@dataclass(eq=False)
class DirectSource:
    """A producer's cache as this process sees it: [num_blocks, block_len] bytes."""

    route: str  # ROUTE_IPC or ROUTE_SAME_PROCESS
    peer: Peer
    engine_id: str
    instance_id: str
    blocks: torch.Tensor
    mapping: MappedAllocation | None = None  # the IPC mapping to undo when done
    closed: bool = False


class CudaIpcConsumer(TcpConsumer):
    def __init__(self, *, driver: CudaDriver | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._driver = driver
        self._local: LocalEnd | None = None
        self._stream: torch.cuda.Stream | None = None
        self._graphed: GraphedBlockCopy | None = None  # the CUDA copies (I/O thread)
        self._sources: dict[str, DirectSource] = {}  # by producer instance id (I/O thread)
        self.num_direct_transfers = 0

    def _on_register(self, region: KVRegion) -> None:
        self._local = LocalEnd.here("cuda" if region.is_cuda else "cpu")
        if region.is_cuda:
            self._stream = torch.cuda.Stream(region.tensor.device)
            if triton_available() and _graphs_wanted():
                self._graphed = GraphedBlockCopy(region.blocks, self._stream, blocking_wait=_blocking_wait())

    # -- choosing the path, once per producer instance (I/O thread) ----------------------

    def _accept_engine(self, engine: RemoteEngine) -> DirectSource | None:
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
            logger.info("pulls from engine %s go over the side channel (TCP): %s", reply.engine_id, why)
            return None
        self._retire(lambda s: s.engine_id == reply.engine_id)  # an older instance of that engine
        self._sources[reply.instance_id] = source
        logger.info("pulls from engine %s copy device memory directly (%s)", reply.engine_id, source.route)
        return source

    def _same_process_source(
        self, engine: RemoteEngine, export: CudaIpcExport
    ) -> tuple[DirectSource | None, str]:
        reply = engine.reply
        with _local_producers_lock:
            region = _local_producers.get(reply.instance_id)
        if region is None or region.base_addr != export.base_addr:
            return None, "it claims to run in this process, but no producer here matches it"
        if (region.num_blocks, region.block_len) != (reply.num_blocks, reply.block_len):
            return None, "its handshake does not describe its cache in this process"
        if region.tensor.device.type != self.region.tensor.device.type:
            return None, "its cache and this one are on different kinds of device"
        source = DirectSource(
            ROUTE_SAME_PROCESS, engine.peer, reply.engine_id, reply.instance_id, region.blocks
        )
        return source, ""

    def _map(self, engine: RemoteEngine, export: CudaIpcExport) -> DirectSource:
        reply: HandshakeReply = engine.reply
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

    # -- moving the bytes (I/O thread) ------------------------------------------------------

    def _dispatch(self, pull: Pull) -> None:
        pull.phases_ns = {"dispatched": time.perf_counter_ns()}
        self._link.submit(lambda: self._dequeued(pull))

    def _dequeued(self, pull: Pull) -> None:
        pull.phases_ns["dequeued"] = time.perf_counter_ns()
        self._begin(pull)

    def _transfer(self, pull: Pull, engine: RemoteEngine) -> None:
        source: DirectSource | None = engine.transfer
        if source is None:
            super()._transfer(pull, engine)
            return
        phases = pull.phases_ns if pull.phases_ns is not None else {}
        phases["started"] = time.perf_counter_ns()
        if source.closed:
            self._fail(pull, "the mapping of the producer's cache was dropped (it restarted or went away)")
            return
        if self._graphed is not None:
            self._graphed.copy(source.blocks, pull.remote_ids, pull.local_ids, phases)
            gpu_s = self._graphed.wait()
            phases["gpu_done"] = time.perf_counter_ns()
            phases["gpu_ns"] = round(gpu_s * 1e9)
        else:
            self._copy_without_graph(source, pull, phases)
        self.num_direct_transfers += 1
        phases["recorded"] = time.perf_counter_ns()
        self._succeed(pull, num_bytes=len(pull.local_ids) * self.region.block_len, notify=True)

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

    def _lost_peer(self, peer: Peer) -> None:
        # no copy is in flight (they finish inside _transfer); unmap, a new handshake remaps
        self._retire(lambda s: s.peer == peer)

    def _retire(self, matches) -> None:
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

    def _on_close(self) -> None:
        self._retire(lambda _source: True)


class CudaIpcConnector(TcpConnector):
    """TcpConnector's protocol plus a device-memory fast path between engines of one machine."""

    name = "CudaIpcConnector"
    consumer_class = CudaIpcConsumer
    _instance_id: str | None = None  # a producer's, once registered in _local_producers

    def _register_memory(self, region: KVRegion) -> dict[str, Any]:
        if self._producer is None:
            return {}
        export = self._export(region)
        self._instance_id = self._producer.instance_id
        with _local_producers_lock:
            _local_producers[self._instance_id] = region
        return {"cuda_ipc": export.to_message()}

    def _export(self, region: KVRegion) -> CudaIpcExport:
        handle, offset, uuid = b"", 0, ""
        if region.is_cuda:
            uuid = str(torch.cuda.get_device_properties(region.device_id).uuid)
            try:
                exported = cuda_driver().export(region.base_addr, region.device_id)
                handle, offset = exported.handle, exported.offset
            except Exception as e:  # e.g. an allocator whose memory CUDA IPC cannot export
                logger.warning(
                    "cannot export the KV cache for CUDA IPC (%s); consumers will pull over TCP. "
                    "With PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, turn that setting off",
                    e,
                )
        return CudaIpcExport(
            host_id=this_host_id(),
            pid=os.getpid(),
            device="cuda" if region.is_cuda else "cpu",
            device_uuid=uuid,
            handle=handle,
            offset=offset,
            base_addr=region.base_addr,
        )

    def stats(self) -> dict[str, float]:
        stats = super().stats()
        if isinstance(self._consumer, CudaIpcConsumer):
            stats["num_direct_transfers"] = self._consumer.num_direct_transfers
        return stats

    def close(self) -> None:
        if self._instance_id is not None:
            with _local_producers_lock:
                _local_producers.pop(self._instance_id, None)
            self._instance_id = None
        super().close()


def _blocking_wait() -> bool:
    """Wait for a copy's event asleep (PDSERVE_KV_COPY_WAIT=block) instead of spinning."""
    return os.environ.get("PDSERVE_KV_COPY_WAIT", "spin") == "block"


def _graphs_wanted() -> bool:
    """CUDA graphs for the copies unless PDSERVE_KV_COPY_GRAPHS=0 (for comparing the two)."""
    return os.environ.get("PDSERVE_KV_COPY_GRAPHS", "1") != "0"
