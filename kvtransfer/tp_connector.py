"""The KV connector of a tensor-parallel engine: one connector per rank, each over its own
cache's slice of the KV heads.

Rank 0 (the engine's process) holds a TensorParallelConnector. Attached to the engine
(`attach_ranks`), it asks ranks 1..N-1 to start a RankService beside their steps
(executor.start_rank_service); each builds its own part over its own cache and reports
to rank 0 over a private ZMQ control socket (msgpack, never pickle):

- producer: every rank serves its side channel (the configured connector's producer,
  kv_port + rank when kv_port is set). An export leases the blocks on every rank before
  the kv_transfer_params go out, and the params list every rank's side channel
  (tp_plan.ENDPOINTS_KEY). Rank 0's lease decides when the engine frees the blocks; the
  other ranks drop theirs on the consumer's notice or when it expires.
- consumer: rank 0 hands each pull to every rank; each rank's RankPuller pulls the KV
  heads it owns from the producer rank(s) holding them (tp_pull.py) and reports; once
  all have, rank 0 tells every producer rank that it may free the blocks.

The data path of the pulls is TcpConsumer's, against any side-channel producer.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch
import zmq

from common.config.kv_transfer_config import KVTransferConfig
from common.kv_connector import KVConnector, PullResults, TransferRecord
from kvtransfer.connector import ConnectorBase, summed_stats
from kvtransfer.factory import create_connector
from kvtransfer.kv_cache_spec import KVCacheSpec
from kvtransfer.tp_plan import ENDPOINTS_KEY, rank_spec
from kvtransfer.tp_pull import RankPuller

logger = logging.getLogger(__name__)

SERVICE_TARGET = "kvtransfer.tp_connector:serve_rank"
READY_TIMEOUT_S = 300.0  # the ranks may still be loading their shards
ACK_TIMEOUT_S = 10.0
_POLL_MS = 5


def _pack(message: dict[str, Any]) -> bytes:
    return msgpack.packb(message)


@dataclass
class _PendingPull:
    params: dict[str, Any]
    left: set[int]
    errors: list[str] = field(default_factory=list)


class TensorParallelConnector(ConnectorBase):
    """Rank 0's connector; `kv_spec` describes the whole model's cache (all KV heads)."""

    name = "TensorParallelConnector"

    def _setup(self) -> None:
        if self.tp_rank != 0:
            raise ValueError("a TensorParallelConnector lives in rank 0; the other ranks run RankService")
        self._executor: Any = None
        self._producer: KVConnector | None = None
        self._puller: RankPuller | None = None
        self._endpoints: list[list[Any]] = []
        self._pulls: dict[str, _PendingPull] = {}
        self._acks: set[tuple[str, int]] = set()
        self._reports: list[dict[str, Any]] = []
        self._ctx = zmq.Context()
        self._control = self._ctx.socket(zmq.ROUTER)
        self._control.setsockopt(zmq.LINGER, 0)
        port = self._control.bind_to_random_port("tcp://127.0.0.1")
        self._control_address = f"tcp://127.0.0.1:{port}"

    # -- set-up -------------------------------------------------------------------------

    def attach_ranks(self, executor: Any) -> None:
        """Start every other rank's part (the engine calls it before register_kv_cache)."""
        if executor is None:
            if self.tp_size > 1:
                raise ValueError(
                    f"a TensorParallelConnector of {self.tp_size} ranks needs the executor of a "
                    "tensor-parallel engine to start the other ranks' parts"
                )
            return
        self._executor = executor
        executor.start_rank_service(
            SERVICE_TARGET,
            {
                "control": self._control_address,
                "config": self.config.to_dict(),
                "role": self.role,
                "spec": self.kv_spec.to_dict(),
            },
        )

    def register_kv_cache(self, kv_cache: torch.Tensor) -> None:
        if self._executor is None and self.tp_size > 1:
            raise RuntimeError("attach_ranks() must come before register_kv_cache()")
        self._producer, self._puller = _build_rank_parts(
            self.config, self.role, self.kv_spec, 0, self.tp_size, kv_cache
        )
        endpoints: list[Any] = [None] * self.tp_size
        if self._producer is not None:
            endpoints[0] = _endpoint(self._producer)
        deadline = time.monotonic() + READY_TIMEOUT_S
        ready: set[int] = set()
        while len(ready) < self.tp_size - 1:
            for message in self._receive(_POLL_MS * 20):
                if message.get("op") != "ready":
                    continue
                if message.get("error"):
                    raise RuntimeError(
                        f"tensor-parallel rank {message['rank']} could not start its KV connector: "
                        f"{message['error']}"
                    )
                ready.add(message["rank"])
                endpoints[message["rank"]] = message.get("endpoint")
            self._executor.check_ranks_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"tensor-parallel ranks {sorted(set(range(1, self.tp_size)) - ready)} did not start "
                    f"their KV connectors within {READY_TIMEOUT_S:.0f} s"
                )
        self._endpoints = endpoints

    @property
    def side_channel_address(self) -> tuple[str, int]:
        """Rank 0's side channel (each rank has its own; the params list them all)."""
        return self._need_producer("side_channel_address").side_channel_address

    # -- producer -----------------------------------------------------------------------

    def export_blocks(self, request_id: str, block_ids: list[int], num_tokens: int) -> dict[str, Any]:
        producer = self._need_producer("export_blocks")
        params = producer.export_blocks(request_id, block_ids, num_tokens)
        self._broadcast(
            {"op": "export", "request_id": request_id, "block_ids": list(block_ids), "num_tokens": num_tokens}
        )
        waiting = {(request_id, rank) for rank in range(1, self.tp_size)}
        deadline = time.monotonic() + ACK_TIMEOUT_S
        while not waiting <= self._acks:
            self._store(self._receive(_POLL_MS))
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"tensor-parallel ranks did not lease request {request_id!r}'s blocks within "
                    f"{ACK_TIMEOUT_S:.0f} s"
                )
        self._acks -= waiting
        errors = [
            r["error"]
            for r in self._reports
            if r.get("op") == "export_failed" and r.get("request_id") == request_id
        ]
        if errors:
            raise RuntimeError(
                f"a tensor-parallel rank refused to export request {request_id!r}: {errors[0]}"
            )
        params[ENDPOINTS_KEY] = [list(e) for e in self._endpoints]
        return params

    def take_freed_requests(self) -> list[str]:
        return self._need_producer("take_freed_requests").take_freed_requests()

    # -- consumer -----------------------------------------------------------------------

    def start_pull(
        self, request_id: str, params: dict[str, Any], local_block_ids: list[int], remote_block_ids: list[int]
    ) -> None:
        puller = self._need_puller("start_pull")
        puller.start_pull(request_id, params, local_block_ids, remote_block_ids)  # checks the ids
        self._pulls[request_id] = _PendingPull(params, set(range(self.tp_size)))
        self._broadcast(
            {
                "op": "pull",
                "request_id": request_id,
                "params": params,
                "local_block_ids": list(local_block_ids),
                "remote_block_ids": list(remote_block_ids),
            }
        )

    def poll(self) -> PullResults:
        puller = self._need_puller("poll")
        self._store(self._receive(0))
        reports = [(0, rid, err) for rid, err in puller.poll()]
        kept = []
        for r in self._reports:
            if r.get("op") == "pulled":
                reports.append((r["rank"], r["request_id"], r.get("error")))
            else:
                kept.append(r)
        self._reports = kept
        done: list[str] = []
        failed: list[tuple[str, str]] = []
        for rank, request_id, error in reports:
            pending = self._pulls.get(request_id)
            if pending is None:
                continue
            pending.left.discard(rank)
            if error:
                pending.errors.append(f"rank {rank}: {error}")
            if not pending.left:
                del self._pulls[request_id]
                puller.release(request_id, pending.params)
                if pending.errors:
                    failed.append((request_id, "; ".join(pending.errors)))
                else:
                    done.append(request_id)
        return PullResults(done, failed)

    def notify_done(self, request_id: str, params: dict[str, Any]) -> None:
        self._need_puller("notify_done").release(request_id, params)

    # -- both ---------------------------------------------------------------------------

    def stats(self) -> dict[str, float]:
        return summed_stats(self._producer, self._puller)

    def take_transfer_records(self) -> list[TransferRecord]:
        return [] if self._puller is None else self._puller.take_transfer_records()

    def close(self) -> None:
        if self._ctx is None:
            return
        try:
            self._broadcast({"op": "close"})
        except zmq.ZMQError:
            pass
        for part in (self._puller, self._producer):
            if part is not None:
                part.close()
        self._puller = self._producer = None
        self._control.close(linger=0)
        self._ctx.term()
        self._ctx = None

    # -- the control socket -------------------------------------------------------------

    def _broadcast(self, message: dict[str, Any]) -> None:
        data = _pack(message)
        for rank in range(1, self.tp_size):
            self._control.send_multipart([str(rank).encode(), data])

    def _receive(self, timeout_ms: int) -> list[dict[str, Any]]:
        messages = []
        if self._control.poll(timeout_ms):
            while True:
                try:
                    _identity, data = self._control.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                messages.append(msgpack.unpackb(data))
        return messages

    def _store(self, messages: list[dict[str, Any]]) -> None:
        for message in messages:
            if message.get("op") in ("exported", "export_failed"):
                self._acks.add((message["request_id"], message["rank"]))
            if message.get("op") != "exported":
                self._reports.append(message)

    def _need_producer(self, what: str) -> KVConnector:
        return self._need(self._producer, what, "producers")

    def _need_puller(self, what: str) -> RankPuller:
        return self._need(self._puller, what, "consumers")


def _endpoint(producer: Any) -> list[Any]:
    """[host, port, instance id] of a rank's producer side channel."""
    host, port = producer.side_channel_address
    return [host, port, producer.side_channel_instance_id]


def _build_rank_parts(
    config: KVTransferConfig, role: str, spec: KVCacheSpec, rank: int, size: int, kv_cache: torch.Tensor
) -> tuple[KVConnector | None, RankPuller | None]:
    """This rank's producer (the configured connector over its own cache) and puller."""
    producer = puller = None
    if role in ("kv_producer", "kv_both"):
        producer = create_connector(
            config, "kv_producer", rank_spec(spec, size, rank), tp_rank=rank, tp_size=size
        )
        producer.register_kv_cache(kv_cache)
    if role in ("kv_consumer", "kv_both"):
        puller = RankPuller(config, spec, rank, size, kv_cache)
    return producer, puller


# -- ranks 1..N-1 ---------------------------------------------------------------------------


def serve_rank(*, rank: int, size: int, kv_cache: torch.Tensor, args: dict[str, Any]) -> RankService:
    """The service a rank process starts on rank 0's request (rank_worker.start_service)."""
    return RankService(rank, size, kv_cache, args)


class RankService:
    """A rank's producer and puller, driven by rank 0 over the control socket, in a thread."""

    def __init__(self, rank: int, size: int, kv_cache: torch.Tensor, args: dict[str, Any]) -> None:
        self.rank = rank
        self.size = size
        self.kv_cache = kv_cache
        self.args = args
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"kv-tp-rank-{rank}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        ctx = zmq.Context()
        control = ctx.socket(zmq.DEALER)
        control.setsockopt(zmq.IDENTITY, str(self.rank).encode())
        control.setsockopt(zmq.LINGER, 1000)
        control.connect(self.args["control"])
        producer = puller = None
        try:
            try:
                config = KVTransferConfig.from_dict(self.args["config"])
                spec = KVCacheSpec.from_dict(self.args["spec"])
                producer, puller = _build_rank_parts(
                    config, self.args["role"], spec, self.rank, self.size, self.kv_cache
                )
            except Exception as e:
                logger.exception("starting the KV connector of tensor-parallel rank %d failed", self.rank)
                control.send(_pack({"op": "ready", "rank": self.rank, "error": f"{type(e).__name__}: {e}"}))
                return
            endpoint = _endpoint(producer) if producer is not None else None
            control.send(_pack({"op": "ready", "rank": self.rank, "endpoint": endpoint}))
            while not self._stop.is_set():
                if control.poll(_POLL_MS):
                    message = msgpack.unpackb(control.recv())
                    if message.get("op") == "close":
                        return
                    self._handle(control, message, producer, puller)
                if puller is not None:
                    for request_id, error in puller.poll():
                        control.send(
                            _pack(
                                {"op": "pulled", "rank": self.rank, "request_id": request_id, "error": error}
                            )
                        )
                if producer is not None:
                    producer.take_freed_requests()  # rank 0's lease frees the engine's blocks
        finally:
            for part in (puller, producer):
                if part is not None:
                    part.close()
            control.close()
            ctx.term()

    def _handle(self, control: zmq.Socket, message: dict[str, Any], producer, puller) -> None:
        op, request_id = message.get("op"), message.get("request_id")
        if op == "export" and producer is not None:
            try:
                producer.export_blocks(request_id, message["block_ids"], message["num_tokens"])
                reply = {"op": "exported", "rank": self.rank, "request_id": request_id}
            except Exception as e:
                reply = {
                    "op": "export_failed",
                    "rank": self.rank,
                    "request_id": request_id,
                    "error": f"{type(e).__name__}: {e}",
                }
            control.send(_pack(reply))
        elif op == "pull" and puller is not None:
            try:
                puller.start_pull(
                    request_id, message["params"], message["local_block_ids"], message["remote_block_ids"]
                )
            except Exception as e:
                control.send(
                    _pack(
                        {
                            "op": "pulled",
                            "rank": self.rank,
                            "request_id": request_id,
                            "error": f"{type(e).__name__}: {e}",
                        }
                    )
                )
