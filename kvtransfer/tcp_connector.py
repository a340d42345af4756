"""TcpConnector: KV blocks over the ZMQ side channel itself, in pure Python.

The consumer asks the producer for a list of its blocks; the producer answers with one
frame per block, sent without a copy from the cache (a block is one contiguous region;
a GPU cache goes through pinned host memory first); the consumer copies each frame
into its local block. A pull is split into reads of at most `tcp_chunk_bytes`, with
`tcp_window` reads in flight, so that neither side ever holds a whole request's KV in
one message. It works wherever pyzmq does, which makes it the default when NIXL is not
installed.

kv_connector_extra_config keys read here (besides SideChannelConnector's):
    tcp_chunk_bytes   bytes per read (4 MiB)
    tcp_window        reads in flight per pull (4)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import zmq

from kvtransfer.kv_consumer import KVConsumer, Pull, RemoteEngine
from kvtransfer.kv_producer import MAX_READ_BYTES
from kvtransfer.side_channel import ReadRequest
from kvtransfer.side_channel_connector import SideChannelConnector, extra_number

DEFAULT_CHUNK_BYTES = 4 << 20
DEFAULT_WINDOW = 4


@dataclass
class _Progress:
    chunks: list[tuple[list[int], list[int]]]  # (local ids, remote ids) per read
    next_chunk: int = 0
    in_flight: int = 0
    chunks_done: int = 0


class TcpConsumer(KVConsumer):
    def __init__(self, *, chunk_bytes: int, window: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.chunk_bytes = chunk_bytes
        self.window = window

    def _transfer(self, pull: Pull, engine: RemoteEngine) -> None:
        per_read = max(1, min(self.chunk_bytes, MAX_READ_BYTES) // self.region.block_len)
        pull.transfer = _Progress(
            [
                (pull.local_ids[i : i + per_read], pull.remote_ids[i : i + per_read])
                for i in range(0, len(pull.local_ids), per_read)
            ]
        )
        self._send_reads(pull)

    def _send_reads(self, pull: Pull) -> None:
        progress: _Progress = pull.transfer
        while progress.in_flight < self.window and progress.next_chunk < len(progress.chunks):
            local_ids, remote_ids = progress.chunks[progress.next_chunk]
            progress.next_chunk += 1
            progress.in_flight += 1
            self._link.call(
                pull.remote.peer,
                ReadRequest(pull.remote.request_id, remote_ids).to_message(),
                on_reply=partial(self._on_blocks, pull, local_ids, remote_ids),
                on_error=partial(self._fail, pull),
                timeout_s=max(0.001, pull.deadline - time.monotonic()),
            )

    def _on_blocks(
        self,
        pull: Pull,
        local_ids: list[int],
        remote_ids: list[int],
        header: dict[str, Any],
        frames: list[zmq.Frame],
    ) -> None:
        if pull.finished:  # timed out or failed meanwhile: these bytes must not land
            return
        block_len = self.region.block_len
        if (
            header["type"] != "blocks"
            or header.get("block_ids") != remote_ids
            or len(frames) != len(remote_ids)
            or any(len(f.buffer) != block_len for f in frames)
        ):
            self._fail(
                pull,
                f"the producer answered a read of {len(remote_ids)} blocks with a malformed reply "
                f"({header['type']!r}, {len(frames)} frames)",
            )
            return
        self.region.write_blocks(local_ids, [f.buffer for f in frames])
        progress: _Progress = pull.transfer
        progress.in_flight -= 1
        progress.chunks_done += 1
        if progress.chunks_done == len(progress.chunks):
            self._succeed(pull, num_bytes=len(pull.local_ids) * block_len, notify=True)
        else:
            self._send_reads(pull)


class TcpConnector(SideChannelConnector):
    name = "TcpConnector"
    consumer_class: type[TcpConsumer] = TcpConsumer

    def _make_consumer(self) -> KVConsumer:
        extra = self.config.kv_connector_extra_config
        return self.consumer_class(
            chunk_bytes=extra_number(extra, "tcp_chunk_bytes", DEFAULT_CHUNK_BYTES, integer=True),
            window=extra_number(extra, "tcp_window", DEFAULT_WINDOW, integer=True),
            **self._consumer_kwargs(),
        )
