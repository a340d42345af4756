"""The KV-transfer connector interface: what a worker and its engine call on a connector.

One Protocol, which every connector implements in full; `missing_members()` names what
a class lacks, so a connector loaded by name is checked before it is built. The engine
and the worker loop type their connector with it; nothing probes a connector with
getattr. Torch-free: the KV tensor is typed by name only.

`isinstance(obj, KVConnector)` works (the Protocol is runtime-checkable), but before
Python 3.12 it reads every property, and `side_channel_address` raises on a consumer:
check classes with `missing_members()` instead.

Producer side (prefill): register the KV tensor; export a request's blocks, which
gives the `kv_transfer_params` that travel back through the router; the blocks stay
leased until the consumer is done with them or the lease runs out, and
`take_freed_requests()` tells the worker which requests it may now free.

Consumer side (decode): register the KV tensor; start an asynchronous pull of some of
the remote blocks into given local blocks; `poll()` reports finished and failed pulls;
`notify_done()` releases a request the consumer will not pull (a full local prefix hit,
an abort), so the producer never leaks blocks. A pull tells the producer itself when it
ends, however it ends.

Contract for the caller: every request that arrives with kv_transfer_params gets exactly
one `start_pull()` or one `notify_done()`. Local blocks given to `start_pull()` must stay
allocated until `poll()` reports the request, since the transfer writes into them until
then. Call the methods from one thread (the worker's step loop); the connector does its
network I/O in its own threads and never blocks the caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch


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


@runtime_checkable
class KVConnector(Protocol):
    """A KV-transfer connector, as the engine and the worker see it."""

    @property
    def is_producer(self) -> bool:
        """Plays kv_producer or kv_both: exports blocks."""
        ...

    @property
    def is_consumer(self) -> bool:
        """Plays kv_consumer or kv_both: pulls blocks."""
        ...

    @property
    def tp_size(self) -> int:
        """Tensor-parallel ranks this connector serves (one cache each)."""
        ...

    # -- both sides ---------------------------------------------------------------------

    def attach_ranks(self, executor: Any) -> None:
        """Start the parts of the other tensor-parallel ranks through the engine's executor;
        call it before register_kv_cache. `executor` is None for an engine of one rank, for
        which a connector of one cache does nothing; given an executor of several ranks,
        such a connector raises ValueError (build it for tp_size=N instead)."""
        ...

    def register_kv_cache(self, kv_cache: torch.Tensor) -> None:
        """Register the worker's KV tensor [num_blocks, num_layers, 2, kv_heads, block_size,
        head_dim]; a producer starts serving its side channel here."""
        ...

    @property
    def side_channel_address(self) -> tuple[str, int]:
        """(host, port) where a producer serves its side channel (after register_kv_cache);
        RuntimeError on a consumer."""
        ...

    def stats(self) -> dict[str, float]:
        """Counters since start: bytes_transferred, transfer_time_s, num_descriptors,
        num_transfers, num_failed_transfers, num_handshakes on a consumer; num_exported,
        num_held, num_freed_notified, num_freed_expired, num_rejected_messages,
        bytes_served on a producer."""
        ...

    def take_transfer_records(self) -> list[TransferRecord]:
        """The pulls finished since the last call (a consumer's; a producer has none)."""
        ...

    def close(self) -> None:
        """Stop the connector's threads and release its memory registrations."""
        ...

    # -- producer -----------------------------------------------------------------------

    def export_blocks(self, request_id: str, block_ids: list[int], num_tokens: int) -> dict[str, Any]:
        """Lease the request's blocks to a future consumer and return its kv_transfer_params
        (msgpack- and JSON-safe)."""
        ...

    def take_freed_requests(self) -> list[str]:
        """Exported requests whose blocks the worker may free now: released by their
        consumer, or their lease expired. Each request appears once."""
        ...

    # -- consumer -----------------------------------------------------------------------

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
        ...

    def poll(self) -> PullResults:
        """Pulls that ended since the last call."""
        ...

    def notify_done(self, request_id: str, params: dict[str, Any]) -> None:
        """Tell the producer it may free the request's blocks, without pulling them."""
        ...


# The Protocol's members, in declaration order: what every connector class must define.
KV_CONNECTOR_MEMBERS: tuple[str, ...] = tuple(name for name in vars(KVConnector) if not name.startswith("_"))


def missing_members(cls: type) -> list[str]:
    """The Protocol members `cls` does not define. An attribute set only in __init__ is not
    on the class, so a data member such as `tp_size` needs a class-level default or a property."""
    return [name for name in KV_CONNECTOR_MEMBERS if not hasattr(cls, name)]


class WorkerConnectors(Protocol):
    """How a worker gets its connector: the one factory a role is given (the connector
    package provides it; common never names it)."""

    def default_name(self) -> str:
        """The connector to use when --kv-transfer-config names none."""
        ...

    def build(self, config: Any, spec_fields: dict[str, Any], tp_size: int) -> KVConnector:
        """The worker's connector from its resolved KVTransferConfig, its cache's KVCacheSpec
        fields and its tensor-parallel size (one part per rank); ValueError naming the fix
        when it cannot run here."""
        ...

