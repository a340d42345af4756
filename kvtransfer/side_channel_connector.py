"""A connector built from a producer half and a consumer half that talk over the ZMQ side
channel; its role (kv_producer, kv_consumer, kv_both) decides which halves it has.
TcpConnector and NixlConnector differ only in how the consumer moves the bytes and in
what the producer registers and announces.

kv_connector_extra_config keys read here:
    kv_lease_duration    seconds a producer keeps exported blocks without a notice (30)
    transfer_timeout_s   seconds before a consumer gives a pull up as failed (30)
    side_channel_host    the host consumers should dial (default: kv_ip, or this machine's
                         name when kv_ip is a wildcard such as 0.0.0.0)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from common.kv_connector import PullResults, TransferRecord
from kvtransfer.connector import ConnectorBase, summed_stats
from kvtransfer.kv_consumer import KVConsumer
from kvtransfer.kv_producer import KVProducer
from kvtransfer.kv_region import KVRegion
from kvtransfer.tp_plan import is_multi_rank_pull

DEFAULT_LEASE_DURATION_S = 30.0
DEFAULT_TRANSFER_TIMEOUT_S = 30.0


def extra_number(extra: dict[str, Any], key: str, default: float, *, integer: bool = False) -> Any:
    """A positive number from kv_connector_extra_config, or ValueError naming the key."""
    value = extra.get(key, default)
    kinds = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) or value <= 0:
        kind = "a positive integer" if integer else "a positive number"
        raise ValueError(f"kv_connector_extra_config.{key} must be {kind}, got {value!r}")
    return value


def extra_str(extra: dict[str, Any], key: str) -> str | None:
    value = extra.get(key)
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"kv_connector_extra_config.{key} must be a non-empty string, got {value!r}")
    return value


class SideChannelConnector(ConnectorBase):
    def _setup(self) -> None:
        extra = self.config.kv_connector_extra_config
        self.lease_duration_s = float(extra_number(extra, "kv_lease_duration", DEFAULT_LEASE_DURATION_S))
        self.transfer_timeout_s = float(extra_number(extra, "transfer_timeout_s", DEFAULT_TRANSFER_TIMEOUT_S))
        advertise_host = extra_str(extra, "side_channel_host")
        self._producer: KVProducer | None = None
        self._consumer: KVConsumer | None = None
        self._kv_cache: torch.Tensor | None = None
        self._rank_puller: Any = None  # tp_pull.RankPuller, built for the first multi-rank producer
        self._rank_pulls: dict[str, dict[str, Any]] = {}  # its pulls in flight: request id -> params
        self._pull_waker: Callable[[], None] | None = None
        if self.is_producer:
            self._producer = KVProducer(
                connector_name=self.name,
                engine_id=self.config.engine_id,
                spec=self.kv_spec,
                host=self.config.kv_ip,
                # one side channel per TP rank; port 0 lets the system pick a free one
                port=self.config.kv_port + self.tp_rank if self.config.kv_port else 0,
                advertise_host=advertise_host,
                tp_size=self.tp_size,
                lease_duration_s=self.lease_duration_s,
            )
        if self.is_consumer:
            self._consumer = self._make_consumer()

    # -- what a subclass provides ---------------------------------------------------------

    def _make_consumer(self) -> KVConsumer:
        raise NotImplementedError

    def _consumer_kwargs(self) -> dict[str, Any]:
        """What every KVConsumer subclass takes, from this connector's config."""
        return {
            "engine_id": self.config.engine_id,
            "spec": self.kv_spec,
            "tp_size": self.tp_size,
            "timeout_s": self.transfer_timeout_s,
        }

    def _register_memory(self, region: KVRegion) -> dict[str, Any]:
        """Register `region` with the data path; what the producer announces about it in
        its handshake, as keyword arguments of KVProducer.start (nixl=, cuda_ipc=)."""
        return {}

    def _notification_source(self) -> Callable[[], list[str]] | None:
        """Request ids released through the data path, polled by the producer's thread."""
        return None

    # -- the Protocol ----------------------------------------------------------------------

    @property
    def side_channel_address(self) -> tuple[str, int]:
        """(host, port) of a producer's side channel, once its KV cache is registered."""
        return self._need_producer("side_channel_address").address

    @property
    def side_channel_instance_id(self) -> str:
        """The producer's instance id (it tells this run's blocks from a restarted producer's)."""
        return self._need_producer("side_channel_instance_id").instance_id

    def register_kv_cache(self, kv_cache: torch.Tensor) -> None:
        region = KVRegion(kv_cache, self.kv_spec)
        self._kv_cache = kv_cache
        announced = self._register_memory(region)
        if self._producer is not None:
            self._producer.start(region, notifications=self._notification_source(), **announced)
        if self._consumer is not None:
            self._consumer.start(region)

    def export_blocks(self, request_id: str, block_ids: list[int], num_tokens: int) -> dict[str, Any]:
        return self._need_producer("export_blocks").export_blocks(request_id, block_ids, num_tokens)

    def take_freed_requests(self) -> list[str]:
        return self._need_producer("take_freed_requests").take_freed_requests()

    def start_pull(
        self, request_id: str, params: dict[str, Any], local_block_ids: list[int], remote_block_ids: list[int]
    ) -> None:
        consumer = self._need_consumer("start_pull")
        if is_multi_rank_pull(params, self.tp_size):  # a tensor-parallel producer: its ranks' heads
            self._multi_rank_puller().start_pull(request_id, params, local_block_ids, remote_block_ids)
            self._rank_pulls[request_id] = params
            return
        consumer.start_pull(request_id, params, local_block_ids, remote_block_ids)

    def poll(self) -> PullResults:
        results = self._need_consumer("poll").poll()
        if self._rank_puller is not None:
            for request_id, error in self._rank_puller.poll():
                self._rank_puller.release(request_id, self._rank_pulls.pop(request_id, {}))
                if error is None:
                    results.done.append(request_id)
                else:
                    results.failed.append((request_id, error))
        return results

    def notify_done(self, request_id: str, params: dict[str, Any]) -> None:
        consumer = self._need_consumer("notify_done")
        if is_multi_rank_pull(params, self.tp_size):
            self._multi_rank_puller().release(request_id, params)
            return
        consumer.notify_done(request_id, params)

    def set_pull_waker(self, wake: Callable[[], None]) -> None:
        """Call `wake` (from the connector's I/O thread) whenever a pull lands or fails, so
        a caller sleeping between its poll() calls learns of it at once."""
        self._pull_waker = wake
        if self._consumer is not None:
            self._consumer.on_outcome = wake
        if self._rank_puller is not None:
            self._rank_puller.on_outcome = wake

    def _multi_rank_puller(self) -> Any:
        if self._rank_puller is None:
            if self._kv_cache is None:
                raise RuntimeError("register_kv_cache() must come before start_pull()")
            from kvtransfer.tp_pull import RankPuller  # it builds on this module

            self._rank_puller = RankPuller(self.config, self.kv_spec, 0, 1, self._kv_cache)
            self._rank_puller.on_outcome = self._pull_waker
        return self._rank_puller

    def stats(self) -> dict[str, float]:
        return summed_stats(self._producer, self._consumer, self._rank_puller)

    def take_transfer_records(self) -> list[TransferRecord]:
        records = [] if self._consumer is None else self._consumer.take_transfer_records()
        if self._rank_puller is not None:
            records += self._rank_puller.take_transfer_records()
        return records

    def close(self) -> None:
        if self._rank_puller is not None:
            self._rank_puller.close()
            self._rank_puller = None
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
        if self._producer is not None:
            self._producer.close()
            self._producer = None

    def _need_producer(self, what: str) -> KVProducer:
        return self._need(self._producer, what, "producers")

    def _need_consumer(self, what: str) -> KVConsumer:
        return self._need(self._consumer, what, "consumers")
