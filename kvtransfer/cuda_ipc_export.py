"""What a producer offering direct copies (CudaIpcConnector, NixlConnector) tells consumers
about its KV cache, and how a consumer picks its data path from that.

The producer adds a `cuda_ipc` map to its side-channel handshake reply, in plain msgpack
fields (never pickle):

    host_id      the boot id and host name of the producer's machine: equal on both ends
                 means one operating system, where CUDA IPC may work
    pid          the producer's process id
    device       "cuda" or "cpu": where the cache lives
    device_uuid  the GPU's UUID ("" on CPU), for the logs and for telling devices apart
    handle       the 64-byte CUDA IPC handle of the allocation holding the cache
                 (empty where none could be made: CPU, or an allocator CUDA IPC cannot export)
    offset       bytes from the start of that allocation to block 0
    base_addr    block 0's address in the producer's process

The consumer then moves blocks one of three ways (`choose_route`):

    same_process  the producer is a connector in this very process: copy from its tensor
    ipc           same machine, both caches on CUDA, a handle: map the producer's
                  allocation once and copy on the GPU
    fallback      anything else: the connector's own path (CudaIpcConnector: the side
                  channel's block reads, as TcpConnector does; NixlConnector: NIXL READs)

This module is torch-free; it only checks and decides.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

from kvtransfer.side_channel import MessageError, get_bytes, get_int, get_str

HANDLE_BYTES = 64  # sizeof(CUipcMemHandle)
MAX_HOST_ID_CHARS = 512
MAX_ADDRESS = (1 << 64) - 1

ROUTE_SAME_PROCESS = "same_process"
ROUTE_IPC = "ipc"
ROUTE_FALLBACK = "fallback"


def this_host_id() -> str:
    """The boot id and host name: one value per running operating system (containers
    that share a kernel share the boot id, and CUDA IPC may still fail between them,
    which the consumer finds out when it maps the handle)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot_id = f.read().strip()
    except OSError:
        boot_id = "no-boot-id"
    return f"{boot_id}/{socket.gethostname()}"[:MAX_HOST_ID_CHARS]


@dataclass(frozen=True)
class CudaIpcExport:
    host_id: str
    pid: int
    device: str  # "cuda" | "cpu"
    device_uuid: str
    handle: bytes  # HANDLE_BYTES bytes, or b"" when there is none
    offset: int
    base_addr: int

    def __post_init__(self) -> None:
        if self.device not in ("cuda", "cpu"):
            raise MessageError(f"field 'device' must be cuda or cpu, got {self.device!r}")
        if len(self.handle) not in (0, HANDLE_BYTES):
            raise MessageError(
                f"field 'handle' must hold {HANDLE_BYTES} bytes (or none), got {len(self.handle)}"
            )
        if self.handle and self.device != "cuda":
            raise MessageError("a CUDA IPC handle came with a cache that is not on a CUDA device")

    def to_message(self) -> dict[str, Any]:
        return {
            "host_id": self.host_id,
            "pid": self.pid,
            "device": self.device,
            "device_uuid": self.device_uuid,
            "handle": self.handle,
            "offset": self.offset,
            "base_addr": self.base_addr,
        }

    @classmethod
    def from_message(cls, message: Any) -> CudaIpcExport:
        """Check a handshake reply's `cuda_ipc` map; MessageError says what is wrong."""
        if not isinstance(message, dict):
            raise MessageError(f"field 'cuda_ipc' must be a map, got {type(message).__name__}")
        uuid = message.get("device_uuid")
        if not isinstance(uuid, str) or len(uuid) > 128:
            raise MessageError("field 'device_uuid' must be a string of at most 128 characters")
        return cls(
            host_id=get_str(message, "host_id", MAX_HOST_ID_CHARS),
            pid=get_int(message, "pid", 1, 1 << 32),
            device=get_str(message, "device", 8),
            device_uuid=uuid,
            handle=get_bytes(message, "handle", HANDLE_BYTES),
            offset=get_int(message, "offset", 0, MAX_ADDRESS),
            base_addr=get_int(message, "base_addr", 0, MAX_ADDRESS),
        )

    def check_extent(self, num_blocks: int, block_len: int) -> None:
        """The cache's claimed extent must fit the address space; MessageError if not."""
        end = num_blocks * block_len
        if self.base_addr + end > MAX_ADDRESS or self.offset + end > MAX_ADDRESS:
            raise MessageError("the producer's KV cache runs past the end of the address space")


@dataclass(frozen=True)
class LocalEnd:
    """The consumer's side of the decision."""

    host_id: str
    pid: int
    device: str  # "cuda" | "cpu": where this consumer's cache lives

    @classmethod
    def here(cls, device: str) -> LocalEnd:
        return cls(this_host_id(), os.getpid(), device)


def choose_route(export: CudaIpcExport | None, local: LocalEnd) -> tuple[str, str]:
    """(route, why) for pulls from a producer that announced `export` (None: it announced
    nothing, e.g. a TcpConnector producer)."""
    if export is None:
        return ROUTE_FALLBACK, (
            "the producer offers no CUDA IPC export (it runs another connector, or has direct "
            "copies turned off)"
        )
    if export.host_id != local.host_id:
        return ROUTE_FALLBACK, "the producer runs on another machine"
    if export.pid == local.pid:
        return ROUTE_SAME_PROCESS, "the producer runs in this process"
    if export.device != "cuda" or local.device != "cuda":
        return ROUTE_FALLBACK, "CUDA IPC needs both KV caches in GPU memory"
    if not export.handle:
        return ROUTE_FALLBACK, "the producer could not export a CUDA IPC handle for its cache"
    return ROUTE_IPC, "same machine, both caches on CUDA"
