"""The consumer half of a connector: pulls of remote blocks into local ones.

What every data path shares lives here: checking the caller's arguments and the
kv_transfer_params, one handshake per producer (compatibility hash, engine identity),
deadlines, the lease's expiry, telling the producer when a pull ends, and the counters.
A subclass moves the bytes (`_transfer`) once the handshake is done.

Threads: the caller's thread only queues work and drains results; everything else runs
in the PeerLink's I/O thread, which alone touches the state below marked "I/O thread".
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from common.kv_connector import PullResults, TransferRecord
from kvtransfer.kv_cache_spec import KVCacheSpec
from kvtransfer.kv_producer import zmq_address
from kvtransfer.kv_region import KVRegion
from kvtransfer.peer_link import Peer, PeerLink
from kvtransfer.side_channel import DoneRequest, HandshakeReply, HandshakeRequest
from kvtransfer.transfer_params import RemoteBlocks

logger = logging.getLogger(__name__)

MAX_TRANSFER_RECORDS = 4096


@dataclass(eq=False)
class Pull:
    request_id: str
    remote: RemoteBlocks
    local_ids: list[int]
    remote_ids: list[int]
    deadline: float  # time.monotonic()
    started: float = 0.0  # when the data movement began
    finished: bool = False
    transfer: Any = None  # the data path's own state
    phases_ns: dict[str, int] | None = None  # where the data path times its phases


@dataclass(eq=False)
class RemoteEngine:
    """A producer this consumer has shaken hands with."""

    peer: Peer
    reply: HandshakeReply
    transfer: Any = None  # the data path's own state (NIXL: the remote agent)


@dataclass
class _Outcome:
    request_id: str
    error: str | None
    record: TransferRecord | None = None


@dataclass
class _Counters:
    num_transfers: int = 0
    num_failed_transfers: int = 0
    bytes_transferred: int = 0
    transfer_time_s: float = 0.0
    num_descriptors: int = 0
    records: collections.deque = field(default_factory=lambda: collections.deque(maxlen=MAX_TRANSFER_RECORDS))


class KVConsumer(ABC):
    def __init__(
        self,
        *,
        engine_id: str,
        spec: KVCacheSpec,
        tp_size: int = 1,
        timeout_s: float = 30.0,
        release_producer: bool = True,
    ) -> None:
        """release_producer=False: a pull's end does not tell the producer (a tensor-parallel
        consumer releases the request once every rank's part has landed: tp_pull.py)."""
        self.engine_id = engine_id
        self.release_producer = release_producer
        self.spec = spec
        self.tp_size = tp_size
        self.timeout_s = timeout_s
        self.region: KVRegion | None = None
        self._outcomes: queue.SimpleQueue[_Outcome] = queue.SimpleQueue()
        # called (from the I/O thread) whenever an outcome is queued: a caller sleeping in
        # its own poll() wakes at once instead of finding the pull on its next check
        self.on_outcome: Callable[[], None] | None = None
        self._pending: set[str] = set()  # caller's thread: started, not yet reported
        self._counters = _Counters()
        self._counters_lock = threading.Lock()
        self.num_handshakes = 0
        # I/O thread
        self._engines: dict[Peer, RemoteEngine] = {}
        self._handshaking: dict[Peer, list[Pull]] = {}
        self._active: dict[str, Pull] = {}
        self._link = PeerLink("kv-consumer-io", ticker=self._tick, on_disconnect=self._on_disconnect)

    # -- the caller's thread ----------------------------------------------------------------

    def start(self, region: KVRegion) -> None:
        if self.region is not None:
            raise RuntimeError("the KV cache is already registered with this connector")
        self.region = region
        self._on_register(region)

    def start_pull(
        self, request_id: str, params: dict[str, Any], local_block_ids: list[int], remote_block_ids: list[int]
    ) -> None:
        region = self.region
        if region is None:
            raise RuntimeError("register_kv_cache() must come before start_pull()")
        if request_id in self._pending:
            raise ValueError(f"request {request_id!r} is already being pulled; wait for poll() to report it")
        local_ids, remote_ids = list(local_block_ids), list(remote_block_ids)
        if len(local_ids) != len(remote_ids):
            raise ValueError(
                f"start_pull got {len(local_ids)} local and {len(remote_ids)} remote block ids; "
                "they pair up one to one"
            )
        bad = [b for b in local_ids if not 1 <= b < region.num_blocks]
        if bad:
            raise ValueError(f"local block ids {bad[:8]} are outside 1..{region.num_blocks - 1}")
        if len(set(local_ids)) != len(local_ids):
            raise ValueError("local block ids repeat; each remote block needs its own local block")
        self._pending.add(request_id)
        try:
            remote = RemoteBlocks.from_params(params)
        except ValueError as e:
            self._report(_Outcome(request_id, str(e)))
            return
        stray = set(remote_ids) - set(remote.block_ids)
        if stray:
            self._pending.discard(request_id)
            raise ValueError(
                f"remote block ids {sorted(stray)[:8]} are not among the remote_block_ids of "
                f"request {request_id!r}'s kv_transfer_params"
            )
        pull = Pull(request_id, remote, local_ids, remote_ids, time.monotonic() + self.timeout_s)
        self._dispatch(pull)

    def poll(self) -> PullResults:
        done: list[str] = []
        failed: list[tuple[str, str]] = []
        while True:
            try:
                outcome = self._outcomes.get_nowait()
            except queue.Empty:
                break
            self._pending.discard(outcome.request_id)
            with self._counters_lock:
                c = self._counters
                if outcome.error is None:
                    done.append(outcome.request_id)
                    if outcome.record is not None:
                        c.num_transfers += 1
                        c.bytes_transferred += outcome.record.num_bytes
                        c.transfer_time_s += outcome.record.seconds
                        c.num_descriptors += outcome.record.num_descriptors
                        c.records.append(outcome.record)
                else:
                    failed.append((outcome.request_id, outcome.error))
                    c.num_failed_transfers += 1
        return PullResults(done, failed)

    def notify_done(self, request_id: str, params: dict[str, Any]) -> None:
        try:
            remote = RemoteBlocks.from_params(params)
        except ValueError as e:
            logger.warning("cannot release request %s at its producer: %s", request_id, e)
            return
        self._send_done(remote)

    def stats(self) -> dict[str, float]:
        with self._counters_lock:
            c = self._counters
            return {
                "num_transfers": c.num_transfers,
                "num_failed_transfers": c.num_failed_transfers,
                "bytes_transferred": c.bytes_transferred,
                "transfer_time_s": c.transfer_time_s,
                "num_descriptors": c.num_descriptors,
                "num_handshakes": self.num_handshakes,
            }

    def take_transfer_records(self) -> list[TransferRecord]:
        with self._counters_lock:
            records = list(self._counters.records)
            self._counters.records.clear()
            return records

    def close(self) -> None:
        self._link.close()
        self._on_close()

    # -- the I/O thread ---------------------------------------------------------------------

    def _begin(self, pull: Pull) -> None:
        self._active[pull.request_id] = pull
        expired = self._lease_expired(pull)
        if expired:
            self._fail(pull, expired)
            return
        if not pull.remote_ids:  # nothing to move: release the producer's blocks now
            self._succeed(pull, num_bytes=0, notify=True)
            return
        peer = pull.remote.peer
        engine = self._engines.get(peer)
        if engine is not None:
            if self._mismatch(engine, pull) is None:
                self._start_transfer(pull, engine)
                return
            del self._engines[peer]  # the producer there restarted: shake hands again
        waiting = self._handshaking.get(peer)
        if waiting is not None:
            waiting.append(pull)
            return
        self._handshaking[peer] = [pull]
        request = HandshakeRequest(self.engine_id, self.spec.compat_hash(), self.spec)
        self._link.call(
            peer,
            request.to_message(),
            on_reply=lambda header, _frames: self._on_handshake(peer, header),
            on_error=lambda text: self._on_handshake_failed(peer, text),
            timeout_s=self.timeout_s,
        )

    def _on_handshake(self, peer: Peer, header: dict[str, Any]) -> None:
        waiting = self._handshaking.pop(peer, [])
        try:
            reply = HandshakeReply.from_message(header)
            self._check_compatible(reply)
            engine = RemoteEngine(peer, reply)
            engine.transfer = self._accept_engine(engine)
        except Exception as e:  # a bad reply, an incompatible engine, or the data path refusing it
            for pull in waiting:
                self._fail(pull, f"cannot pull from the producer at {zmq_address(*peer)}: {e}")
            return
        self.num_handshakes += 1
        self._engines[peer] = engine
        for pull in waiting:
            if pull.finished:
                continue
            mismatch = self._mismatch(engine, pull)
            if mismatch is not None:
                self._fail(pull, mismatch)
            else:
                self._start_transfer(pull, engine)

    def _on_handshake_failed(self, peer: Peer, text: str) -> None:
        for pull in self._handshaking.pop(peer, []):
            self._fail(pull, f"handshake with the producer at {zmq_address(*peer)} failed: {text}")

    def _check_compatible(self, reply: HandshakeReply) -> None:
        if reply.compat_hash != self.spec.compat_hash() or reply.kv_spec != self.spec:
            differences = self.spec.differences(reply.kv_spec) or ["the KV cache layout (different releases)"]
            raise ValueError(
                f"refusing to pull from engine {reply.engine_id}: its KV cache is incompatible "
                f"({'; '.join(differences)}); start both engines with the same model, dtype, "
                "--block-size and --kv-cache-dtype"
            )
        if reply.block_len != self.region.block_len:
            raise ValueError(
                f"engine {reply.engine_id} has {reply.block_len}-byte blocks, this engine "
                f"{self.region.block_len}-byte ones"
            )
        if reply.tp_size != self.tp_size:
            raise ValueError(
                f"engine {reply.engine_id} runs tensor parallel size {reply.tp_size}, this engine "
                f"{self.tp_size}; pulling between different TP sizes is not supported"
            )

    def _mismatch(self, engine: RemoteEngine, pull: Pull) -> str | None:
        """Why the producer behind the handshake cannot serve this pull, or None."""
        reply, remote = engine.reply, pull.remote
        if reply.engine_id != remote.engine_id or (
            remote.instance_id is not None and remote.instance_id != reply.instance_id
        ):
            return (
                f"the producer at {zmq_address(*engine.peer)} is no longer the engine that exported "
                f"request {remote.request_id!r} (it restarted or another engine took its port); "
                "the blocks are gone"
            )
        bad = [b for b in pull.remote_ids if not 0 <= b < reply.num_blocks]
        if bad:
            return f"remote block ids {bad[:8]} are outside the producer's {reply.num_blocks} blocks"
        return None

    def _start_transfer(self, pull: Pull, engine: RemoteEngine) -> None:
        pull.started = time.monotonic()
        try:
            self._transfer(pull, engine)
        except Exception as e:
            logger.exception("KV pull of request %s failed to start", pull.request_id)
            self._fail(pull, f"the transfer failed to start: {type(e).__name__}: {e}")

    def _tick(self) -> float | None:
        now = time.monotonic()
        for pull in [p for p in self._active.values() if p.deadline <= now]:
            if self._cancel(pull):
                self._fail(
                    pull,
                    f"the pull from {zmq_address(*pull.remote.peer)} did not finish in "
                    f"{self.timeout_s:g} s (kv_connector_extra_config.transfer_timeout_s)",
                )
        return self._tick_transfers()

    def _on_disconnect(self, peer: Peer) -> None:
        self._engines.pop(peer, None)
        self._lost_peer(peer)

    def _succeed(self, pull: Pull, num_bytes: int, notify: bool) -> None:
        if pull.finished:
            return
        expired = self._lease_expired(pull)
        if expired:
            self._fail(pull, expired)
            return
        pull.finished = True
        self._active.pop(pull.request_id, None)
        record = TransferRecord(
            pull.request_id, num_bytes, time.monotonic() - pull.started, len(pull.local_ids), pull.phases_ns
        )
        self._report(_Outcome(pull.request_id, None, record if pull.remote_ids else None))
        if notify and self.release_producer:
            self._send_done(pull.remote)

    def _fail(self, pull: Pull, reason: str) -> None:
        if pull.finished:
            return
        pull.finished = True
        self._active.pop(pull.request_id, None)
        logger.warning("KV pull of request %s failed: %s", pull.request_id, reason)
        self._report(_Outcome(pull.request_id, reason))
        if self.release_producer:
            self._send_done(pull.remote)  # the producer may free its blocks at once

    def _report(self, outcome: _Outcome) -> None:
        self._outcomes.put(outcome)
        wake = self.on_outcome
        if wake is not None:
            wake()

    def _lease_expired(self, pull: Pull) -> str | None:
        expiry = pull.remote.expiry_time
        if expiry is None or time.time() <= expiry:
            return None
        return (
            f"the producer's lease on request {pull.remote.request_id!r}'s blocks expired before the "
            "pull finished; raise kv_connector_extra_config.kv_lease_duration on the producer"
        )

    def _send_done(self, remote: RemoteBlocks) -> None:
        def on_error(text: str) -> None:
            logger.info("could not release request %s at its producer: %s", remote.request_id, text)

        self._link.call(
            remote.peer,
            DoneRequest(remote.request_id).to_message(),
            on_reply=lambda _header, _frames: None,
            on_error=on_error,
            timeout_s=self.timeout_s,
        )

    # -- what a data path provides ------------------------------------------------------------

    def _dispatch(self, pull: Pull) -> None:
        """Hand a checked pull to the I/O thread (caller's thread); a data path may start it
        here instead."""
        self._link.submit(lambda: self._begin(pull))

    def _on_register(self, region: KVRegion) -> None:  # noqa: B027 (optional hook)
        """Prepare local state for `region` (caller's thread)."""

    def _accept_engine(self, engine: RemoteEngine) -> Any:
        """Check and load what the handshake told about a producer; the result becomes
        engine.transfer. Raise ValueError to refuse the producer."""
        return None

    @abstractmethod
    def _transfer(self, pull: Pull, engine: RemoteEngine) -> None:
        """Start moving pull.remote_ids into pull.local_ids; end with _succeed or _fail."""

    def _cancel(self, pull: Pull) -> bool:
        """Stop a pull that timed out; True once it can no longer write to local blocks."""
        return True

    def _tick_transfers(self) -> float | None:
        """Progress transfers on each turn of the I/O loop; return how soon to come back."""
        return None

    def _lost_peer(self, peer: Peer) -> None:  # noqa: B027 (optional hook)
        """The side channel to `peer` broke; fail its transfers that depend on it."""

    def _on_close(self) -> None:  # noqa: B027 (optional hook)
        """Release the data path's resources after the I/O thread stopped."""
