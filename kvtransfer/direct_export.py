"""A producer's KV cache offered to consumers on its machine for direct copies.

A producer that offers them (CudaIpcConnector; NixlConnector unless same_host_copy is
off) exports its whole cache allocation once, as a CUDA IPC handle, and announces it in
its handshake reply's `cuda_ipc` field (kvtransfer/cuda_ipc_export.py describes the
fields). On CPU, or where the allocation cannot be exported, the announcement carries no
handle, and consumers in other processes take the connector's own path.

While the producer lives, its cache is also listed in this process's registry of
producers. A consumer in the same process copies only from regions listed here, so a
peer that merely claims to be this process cannot point it at arbitrary memory.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import torch

from kvtransfer.cuda_ipc_driver import cuda_driver
from kvtransfer.cuda_ipc_export import CudaIpcExport, this_host_id
from kvtransfer.kv_region import KVRegion

logger = logging.getLogger(__name__)

# producers of this process by instance id
_local_producers: dict[str, KVRegion] = {}
_local_producers_lock = threading.Lock()


def local_producer(instance_id: str) -> KVRegion | None:
    """The cache of the producer `instance_id` if it runs in this process, else None."""
    with _local_producers_lock:
        return _local_producers.get(instance_id)


class DirectExport:
    """One producer's offer: its export for the handshake, and its registry entry until
    close(). `fallback` names, for the log, how consumers pull when the export fails."""

    def __init__(self, instance_id: str, region: KVRegion, *, fallback: str) -> None:
        self.instance_id = instance_id
        self.export = _export(region, fallback)
        with _local_producers_lock:
            _local_producers[instance_id] = region

    def to_message(self) -> dict[str, Any]:
        return self.export.to_message()

    def close(self) -> None:
        with _local_producers_lock:
            _local_producers.pop(self.instance_id, None)


def _export(region: KVRegion, fallback: str) -> CudaIpcExport:
    handle, offset, uuid = b"", 0, ""
    if region.is_cuda:
        uuid = str(torch.cuda.get_device_properties(region.device_id).uuid)
        try:
            exported = cuda_driver().export(region.base_addr, region.device_id)
            handle, offset = exported.handle, exported.offset
        except Exception as e:  # e.g. an allocator whose memory CUDA IPC cannot export
            logger.warning(
                "cannot export the KV cache for CUDA IPC (%s); consumers on this machine will pull %s. "
                "With PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, turn that setting off",
                e,
                fallback,
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
