"""The base class of kvtransfer's connectors: the fields every one keeps and the
Protocol's members left abstract, so that a connector missing one fails at construction.

The interface itself, with what each member means and the caller's contract, is
common/kv_connector.py's KVConnector Protocol; this class adds nothing to it. Build a
connector with kvtransfer.factory, never by hand.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from common.config.kv_transfer_config import KV_ROLES, KVTransferConfig
from common.kv_connector import PullResults, TransferRecord
from kvtransfer.kv_cache_spec import KVCacheSpec


class ConnectorUnavailableError(RuntimeError):
    """The connector cannot run here (its package is missing or its backend unavailable)."""


def summed_stats(*parts: Any) -> dict[str, float]:
    """The stats() of a connector's parts (None: absent) added up key by key: a producer and
    a consumer count different things, several consumers the same ones."""
    total: dict[str, float] = {}
    for part in parts:
        if part is not None:
            for key, value in part.stats().items():
                total[key] = total.get(key, 0) + value
    return total


class ConnectorBase(ABC):
    """A connector of kvtransfer. Subclasses take (config, role, kv_spec, *, tp_rank=0,
    tp_size=1), so that an out-of-tree class named by kv_connector_module_path is built the
    same way, and build their parts in `_setup()` rather than in their own __init__."""

    name = "ConnectorBase"  # each connector names itself: the handshake reply carries it
    tp_size: int = 1  # set per instance; a class-level default so the class shows the member

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
        self._setup()

    def _setup(self) -> None:  # noqa: B027 (a hook: a connector with nothing to build skips it)
        """Build the connector's parts, once the fields above are set."""

    @property
    def is_producer(self) -> bool:
        return self.role in ("kv_producer", "kv_both")

    @property
    def is_consumer(self) -> bool:
        return self.role in ("kv_consumer", "kv_both")

    def attach_ranks(self, executor: Any) -> None:
        """A connector of one cache: nothing to start for an engine of one rank (executor
        None); an engine of several needs a connector built for them."""
        if executor is None:
            return
        raise ValueError(
            f"the KV connector {type(self).__name__} serves one cache, and this engine runs "
            f"{getattr(executor, 'size', 'several')} tensor-parallel ranks; build it with "
            "tp_size=N through kvtransfer.factory (build_worker_connector or create_engine_connector), "
            "which runs one part per rank"
        )

    # -- the Protocol's members, as common/kv_connector.py describes them -------------------

    @abstractmethod
    def register_kv_cache(self, kv_cache: torch.Tensor) -> None: ...

    @property
    @abstractmethod
    def side_channel_address(self) -> tuple[str, int]: ...

    @abstractmethod
    def stats(self) -> dict[str, float]: ...

    @abstractmethod
    def take_transfer_records(self) -> list[TransferRecord]: ...

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def export_blocks(self, request_id: str, block_ids: list[int], num_tokens: int) -> dict[str, Any]: ...

    @abstractmethod
    def take_freed_requests(self) -> list[str]: ...

    @abstractmethod
    def start_pull(
        self, request_id: str, params: dict[str, Any], local_block_ids: list[int], remote_block_ids: list[int]
    ) -> None: ...

    @abstractmethod
    def poll(self) -> PullResults: ...

    @abstractmethod
    def notify_done(self, request_id: str, params: dict[str, Any]) -> None: ...

    def __enter__(self) -> ConnectorBase:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _need(self, part: Any, what: str, side: str) -> Any:
        """`part` (a producer or consumer half), or RuntimeError: `what` is for the other role."""
        if part is None:
            worker = "prefill" if side == "producers" else "decode"
            use = "kv_producer or kv_both" if side == "producers" else "kv_consumer or kv_both"
            raise RuntimeError(
                f"{what} is for {side}; this {self.name} has kv_role {self.role} "
                f"(use {use} on {worker} workers)"
            )
        return part
