"""The KV-transfer connector: how a prefill engine hands a request's KV-cache blocks to
a decode engine.

Producer side (prefill): register the KV tensor; export a request's blocks, which
gives the `kv_transfer_params` that travel back through the router; the blocks stay
leased until the consumer is done with them or the lease runs out, and
`take_freed_requests()` tells the worker's step loop which requests it may now free.

Consumer side (decode): register the KV tensor; start an asynchronous pull of some of
the remote blocks into given local blocks; `poll()` reports finished and failed pulls;
`notify_done()` releases a request the consumer will not pull (a full local prefix hit,
an abort), so the producer never leaks blocks. A pull tells the producer itself when
it ends, however it ends.

Contract for the caller: every request that arrives with kv_transfer_params gets
exactly one `start_pull()` or one `notify_done()`. Local blocks given to `start_pull()`
must stay allocated until `poll()` reports the request, since the transfer writes
into them until then. Call the methods from one thread (the worker's step loop); the
connector does its network I/O in its own threads and never blocks the caller.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from common.config.kv_transfer_config import KV_ROLES, KVTransferConfig
from kvtransfer.kv_cache_spec import KVCacheSpec


class ConnectorUnavailableError(RuntimeError):
    """The connector cannot run here (its package is missing or its backend unavailable)."""


class PullResults(NamedTuple):
    done: list[str]  # request ids whose blocks are now in the local cache
    failed: list[tuple[str, str]]  # (request id, why); their local blocks hold nothing usable


@dataclass(frozen=True)
class TransferRecord:
    """One finished pull, for histograms (vllm:nixl_xfer_time_seconds and friends)."""

    request_id: str
    num_bytes: int
    seconds: float  # from the start of the data movement (after the handshake) to its end
    num_descriptors: int  # one per block
    # host time.perf_counter_ns() at each phase of the pull, where the data path records
    # them (CudaIpcConnector: dispatched, dequeued, started, packed, launched, gpu_done,
    # recorded; plus gpu_ns, the copy's CUDA-event time); None elsewhere
    phases_ns: dict[str, int] | None = None


class KVConnector(ABC):
    """The interface every connector implements; construct one with `create_connector()`.

    Subclasses take (config, role, kv_spec, *, tp_rank=0, tp_size=1), so that an
    out-of-tree class named by kv_connector_module_path is built the same way.
    """

    name = "KVConnector"

    def __init__(
        self,
        config: KVTransferConfig,
        role: str,
        kv_spec: KVCacheSpec,
        *,
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        if role not in KV_ROLES:
            raise ValueError(f"Unsupported kv_role {role!r}; choose from {', '.join(KV_ROLES)}")
        self.config = config
        self.role = role
        self.kv_spec = kv_spec
        self.tp_rank = tp_rank
        self.tp_size = tp_size

    @property
    def is_producer(self) -> bool:
        return self.role in ("kv_producer", "kv_both")

    @property
    def is_consumer(self) -> bool:
        return self.role in ("kv_consumer", "kv_both")

    # -- both sides ---------------------------------------------------------------------

    @abstractmethod
    def register_kv_cache(self, kv_cache: torch.Tensor) -> None:
        """Register the worker's KV tensor [num_blocks, num_layers, 2, kv_heads, block_size,
        head_dim]; a producer starts serving its side channel here."""

    @abstractmethod
    def stats(self) -> dict[str, float]:
        """Counters since start: bytes_transferred, transfer_time_s, num_descriptors,
        num_transfers, num_failed_transfers, num_handshakes on a consumer; num_exported,
        num_held, num_freed_notified, num_freed_expired, num_rejected_messages,
        bytes_served on a producer."""

    @abstractmethod
    def take_transfer_records(self) -> list[TransferRecord]:
        """The pulls finished since the last call (a consumer's; a producer has none)."""

    @abstractmethod
    def close(self) -> None:
        """Stop the connector's threads and release its memory registrations."""

    # -- producer -----------------------------------------------------------------------

    @abstractmethod
    def export_blocks(self, request_id: str, block_ids: list[int], num_tokens: int) -> dict[str, Any]:
        """Lease the request's blocks to a future consumer and return its kv_transfer_params
        (msgpack- and JSON-safe)."""

    @abstractmethod
    def take_freed_requests(self) -> list[str]:
        """Exported requests whose blocks the worker may free now: released by their
        consumer, or their lease expired. Each request appears once."""

    # -- consumer -----------------------------------------------------------------------

    @abstractmethod
    def start_pull(
        self,
        request_id: str,
        params: dict[str, Any],
        local_block_ids: list[int],
        remote_block_ids: list[int],
    ) -> None:
        """Begin copying `remote_block_ids` (some of params' remote_block_ids, typically the
        suffix this engine lacks) into `local_block_ids`, pairwise. Returns at once; bad
        params come back as a failure from `poll()`, bad block ids raise ValueError."""

    @abstractmethod
    def poll(self) -> PullResults:
        """Pulls that ended since the last call."""

    @abstractmethod
    def notify_done(self, request_id: str, params: dict[str, Any]) -> None:
        """Tell the producer it may free the request's blocks, without pulling them."""

    def __enter__(self) -> KVConnector:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
