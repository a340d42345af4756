"""CudaIpcConnector: KV blocks between engines on one machine at device speed.

The producer exports its whole KV-cache allocation once, as a CUDA IPC handle, and
announces it in the side-channel handshake (kvtransfer/direct_export.py). A consumer on
the same machine maps that allocation once per producer instance and keeps the mapping;
a pull is then one gather-scatter kernel launch over all the requested blocks on the
consumer's copy stream, an event sync, and the usual "done" notice that releases the
producer's lease (kvtransfer/direct_copy.py). A producer in the same process (tests,
in-process benchmarks) is read straight from its tensor.

Where the direct path cannot work (the producer is on another machine, either cache is
in host memory, the producer offers no export, or the handle does not map) the consumer
falls back, per producer, to the side channel's block reads, exactly as TcpConnector
does, and logs why once. So one configuration serves a single-node deployment at device
speed and still works elsewhere; for multi-node deployments that need speed across
machines, use NixlConnector (which takes the same direct path on one machine).
"""

from __future__ import annotations

import time
from typing import Any

from kvtransfer.cuda_ipc_driver import CudaDriver
from kvtransfer.direct_copy import CountsDirectCopies, DirectCopier, DirectSource
from kvtransfer.direct_export import DirectExport
from kvtransfer.kv_consumer import Pull, RemoteEngine
from kvtransfer.kv_region import KVRegion
from kvtransfer.peer_link import Peer
from kvtransfer.tcp_connector import TcpConnector, TcpConsumer


class CudaIpcConsumer(CountsDirectCopies, TcpConsumer):
    def __init__(self, *, driver: CudaDriver | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._driver = driver
        self._copier: DirectCopier | None = None

    def _on_register(self, region: KVRegion) -> None:
        self._copier = DirectCopier(region, fallback="over the side channel (TCP)", driver=self._driver)

    def _accept_engine(self, engine: RemoteEngine) -> DirectSource | None:
        return self._copier.accept(engine)

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
        error = self._copier.copy(source, pull)
        if error is not None:
            self._fail(pull, error)
            return
        self._succeed(pull, num_bytes=len(pull.local_ids) * self.region.block_len, notify=True)

    def _lost_peer(self, peer: Peer) -> None:
        self._copier.lost_peer(peer)

    def _on_close(self) -> None:
        if self._copier is not None:
            self._copier.close()


class CudaIpcConnector(TcpConnector):
    """TcpConnector's protocol plus a device-memory fast path between engines of one machine."""

    name = "CudaIpcConnector"
    consumer_class = CudaIpcConsumer
    _direct_export: DirectExport | None = None  # a producer's, once its cache is registered

    def _register_memory(self, region: KVRegion) -> dict[str, Any]:
        if self._producer is None:
            return {}
        self._direct_export = DirectExport(self._producer.instance_id, region, fallback="over TCP")
        return {"cuda_ipc": self._direct_export.to_message()}

    def close(self) -> None:
        if self._direct_export is not None:
            self._direct_export.close()
            self._direct_export = None
        super().close()
