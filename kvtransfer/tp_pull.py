"""One tensor-parallel rank's pulls: the KV heads it owns, from the producer ranks holding them.

A RankPuller runs in every consumer rank (rank 0 in the engine's process, the others in
their rank processes, tp_connector.py). For each piece of tp_plan.pull_plan it keeps a
TcpConsumer aimed at that producer rank's side channel, whose blocks it reads whole and
whose piece of heads it copies into this rank's blocks (HeadSliceRegion). It never
tells a producer that a pull ended: the request is released once, by rank 0, when every
rank's part has landed (`release`), so no producer rank frees blocks another consumer
rank still reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from common.config.kv_transfer_config import KVTransferConfig
from common.kv_connector import TransferRecord
from kvtransfer.connector import summed_stats
from kvtransfer.kv_cache_spec import KVCacheSpec
from kvtransfer.kv_consumer import KVConsumer
from kvtransfer.side_channel_connector import DEFAULT_TRANSFER_TIMEOUT_S, extra_number
from kvtransfer.tcp_connector import DEFAULT_CHUNK_BYTES, DEFAULT_WINDOW, TcpConsumer
from kvtransfer.tp_plan import HeadPiece, producer_endpoints, pull_plan, rank_spec
from kvtransfer.transfer_params import RemoteBlocks


def _at(params: dict[str, Any], endpoint: tuple[str, int, str | None]) -> dict[str, Any]:
    """The params aimed at one producer rank's side channel."""
    host, port, instance_id = endpoint
    aimed = {**params, "remote_host": host, "remote_port": port}
    if instance_id is not None:
        aimed["remote_instance_id"] = instance_id
    return aimed


class HeadSliceRegion:
    """What a TcpConsumer writes through: blocks of one producer rank's shape, of which the
    piece's heads are copied into this rank's cache."""

    def __init__(self, kv_cache: torch.Tensor, remote_spec: KVCacheSpec, piece: HeadPiece) -> None:
        self.cache = kv_cache
        self.num_blocks = int(kv_cache.shape[0])
        self.block_shape = remote_spec.kv_cache_shape(1)[1:]
        self.block_len = int(np.prod(self.block_shape)) * kv_cache.element_size()
        self.piece = piece

    def write_blocks(self, block_ids: list[int], buffers: list[Any]) -> None:
        rows = np.empty((len(block_ids), self.block_len), dtype=np.uint8)
        for i, buffer in enumerate(buffers):
            rows[i] = np.frombuffer(buffer, dtype=np.uint8)
        blocks = torch.from_numpy(rows).view(self.cache.dtype).view(len(block_ids), *self.block_shape)
        (rs, re), (ls, le) = self.piece.remote_heads, self.piece.local_heads
        index = torch.tensor(block_ids, dtype=torch.long, device=self.cache.device)
        self.cache[index, :, :, ls:le] = blocks[:, :, :, rs:re].to(self.cache.device)


@dataclass
class _Parts:
    left: int
    errors: list[str] = field(default_factory=list)


class RankPuller:
    """Pulls of one consumer rank (`rank` of `size`) into `kv_cache`; `spec` describes the
    whole model's cache (all KV heads)."""

    def __init__(
        self, config: KVTransferConfig, spec: KVCacheSpec, rank: int, size: int, kv_cache: torch.Tensor
    ) -> None:
        extra = config.kv_connector_extra_config
        self.engine_id = config.engine_id
        self.spec = spec
        self.rank = rank
        self.size = size
        self.kv_cache = kv_cache
        self.timeout_s = float(extra_number(extra, "transfer_timeout_s", DEFAULT_TRANSFER_TIMEOUT_S))
        self.chunk_bytes = extra_number(extra, "tcp_chunk_bytes", DEFAULT_CHUNK_BYTES, integer=True)
        self.window = extra_number(extra, "tcp_window", DEFAULT_WINDOW, integer=True)
        self._consumers: dict[tuple[int, HeadPiece], KVConsumer] = {}
        self._parts: dict[str, _Parts] = {}
        self._outcomes: list[tuple[str, str | None]] = []
        self.on_outcome: Callable[[], None] | None = None  # handed to every piece's consumer

    def start_pull(
        self, request_id: str, params: dict[str, Any], local_block_ids: list[int], remote_block_ids: list[int]
    ) -> None:
        """Start this rank's pieces; ValueError for bad block ids, bad params fail in poll()."""
        local_ids = list(local_block_ids)
        if len(local_ids) != len(remote_block_ids):
            raise ValueError(
                f"start_pull got {len(local_ids)} local and {len(remote_block_ids)} remote block ids; "
                "they pair up one to one"
            )
        bad = [b for b in local_ids if not 1 <= b < self.kv_cache.shape[0]]
        if bad:
            raise ValueError(f"local block ids {bad[:8]} are outside 1..{self.kv_cache.shape[0] - 1}")
        if request_id in self._parts:
            raise ValueError(f"request {request_id!r} is already being pulled; wait for poll() to report it")
        try:
            pieces = self._pieces(params)
        except ValueError as e:
            self._outcomes.append((request_id, str(e)))
            if self.on_outcome is not None:
                self.on_outcome()
            return
        self._parts[request_id] = _Parts(len(pieces))
        for piece, piece_params in pieces:
            self._consumer(piece, piece_params["tp_size"]).start_pull(
                request_id, piece_params, local_ids, list(remote_block_ids)
            )

    def poll(self) -> list[tuple[str, str | None]]:
        """(request id, None when it landed else why not) of this rank's pulls that ended."""
        outcomes, self._outcomes = self._outcomes, []
        for consumer in self._consumers.values():
            done, failed = consumer.poll()
            for request_id, error in [(r, None) for r in done] + failed:
                parts = self._parts.get(request_id)
                if parts is None:
                    continue
                parts.left -= 1
                if error is not None:
                    parts.errors.append(error)
                if parts.left == 0:
                    del self._parts[request_id]
                    outcomes.append((request_id, "; ".join(parts.errors) or None))
        return outcomes

    def release(self, request_id: str, params: dict[str, Any]) -> None:
        """Tell every producer rank the params name that it may free the request's blocks."""
        try:
            remote = RemoteBlocks.from_params(params)
            endpoints = producer_endpoints(params, remote.tp_size)
        except ValueError:
            return  # nothing names a producer to release
        for producer_rank, endpoint in enumerate(endpoints):
            piece = HeadPiece(producer_rank, (0, 0), (0, 0))
            consumer = self._consumer(piece, remote.tp_size)
            consumer.notify_done(request_id, _at(params, endpoint))

    def stats(self) -> dict[str, float]:
        return summed_stats(*self._consumers.values())

    def take_transfer_records(self) -> list[TransferRecord]:
        return [r for c in self._consumers.values() for r in c.take_transfer_records()]

    def close(self) -> None:
        for consumer in self._consumers.values():
            consumer.close()
        self._consumers.clear()

    def _pieces(self, params: dict[str, Any]) -> list[tuple[HeadPiece, dict[str, Any]]]:
        remote = RemoteBlocks.from_params(params)
        endpoints = producer_endpoints(params, remote.tp_size)
        pieces = []
        for piece in pull_plan(self.spec.num_kv_heads, remote.tp_size, self.size, self.rank):
            pieces.append((piece, _at(params, endpoints[piece.producer_rank])))
        return pieces

    def _consumer(self, piece: HeadPiece, producer_tp: int) -> KVConsumer:
        key = (producer_tp, piece)
        consumer = self._consumers.get(key)
        if consumer is None:
            remote_spec = rank_spec(self.spec, producer_tp, piece.producer_rank)
            consumer = TcpConsumer(
                chunk_bytes=self.chunk_bytes,
                window=self.window,
                engine_id=f"{self.engine_id}-rank{self.rank}",
                spec=remote_spec,  # the handshake checks the producer rank's cache against it
                tp_size=producer_tp,
                timeout_s=self.timeout_s,
                release_producer=False,
            )
            consumer.on_outcome = self.on_outcome
            consumer.start(HeadSliceRegion(self.kv_cache, remote_spec, piece))
            self._consumers[key] = consumer
        return consumer
