"""Reading every worker's KV-event stream into the prefix index.

One background thread owns one SUB socket per worker (connected to the worker's event
endpoint) and, where the worker has a replay endpoint, one DEALER socket for replays.
Each message `[topic, seq, payload]` is decoded with common.kv_events (both event
encodings) and applied to the index in seq order:

- a seq beyond the next expected one means batches were missed: the later batches wait
  while the thread asks the replay socket for everything from the first missing seq,
  applies what comes back in order (skipping seqs it already has) and then the waiting
  ones. What the replay cannot supply (too old for the worker's buffer, or no answer
  within `replay_timeout_s`) is counted as lost and skipped.
- the first message seen from a worker with seq > 0 (the router started or connected
  after the worker) is such a gap from seq 0.
- a seq at or below one already seen on the live stream means the worker's publisher
  restarted: its entries are dropped and the stream is read as a new one.
- a malformed message or payload is counted and skipped; it never stops the thread.

See specs/kv-events.md for the frames. Torch-free.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, fields

import zmq

from common.kv_events import KVEventBatch, decode_batch
from router.prefix_index import PrefixIndex

logger = logging.getLogger(__name__)

_END_OF_REPLAY = -1
_POLL_MS = 20  # how often the thread looks at its commands and replay deadlines
_MAX_MESSAGES_PER_WAKE = 1000  # per socket, so one busy worker cannot starve the others


@dataclass
class SubscriberCounters:
    batches_received: int = 0  # from the live streams
    events_indexed: int = 0
    gaps_detected: int = 0
    replay_requests: int = 0
    replayed_batches: int = 0
    replay_timeouts: int = 0
    lost_batches: int = 0  # missed and not recovered by a replay
    duplicates: int = 0
    malformed: int = 0
    restarts: int = 0

    def add(self, other: SubscriberCounters) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass(eq=False)
class _Feed:
    """One worker's stream and where the thread is in it."""

    worker_id: Hashable
    endpoint: str
    replay_endpoint: str | None
    topic: bytes
    sub: zmq.Socket
    dealer: zmq.Socket | None = None
    next_seq: int | None = None  # the next seq to apply; None before the first message
    max_live_seq: int = -1
    waiting: dict[int, KVEventBatch | None] = field(default_factory=dict)  # received past a hole
    replay_deadline: float | None = None  # set while a replay is in flight
    replay_max_seq: int = -1  # the highest seq the replay in flight has brought
    counters: SubscriberCounters = field(default_factory=SubscriberCounters)


class KVEventSubscriber:
    def __init__(
        self,
        index: PrefixIndex,
        context: zmq.Context | None = None,
        replay_timeout_s: float = 2.0,
        max_waiting_batches: int = 10000,
    ) -> None:
        self.index = index
        self._ctx = context if context is not None else zmq.Context.instance()
        self.replay_timeout_s = replay_timeout_s
        self.max_waiting_batches = max_waiting_batches
        self._feeds: dict[Hashable, _Feed] = {}
        self._by_socket: dict[zmq.Socket, _Feed] = {}
        self._poller = zmq.Poller()
        self._commands: queue.Queue[tuple[Callable[[], None], threading.Event]] = queue.Queue()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._retired = SubscriberCounters()  # counters of workers removed since
        self._counters_lock = threading.Lock()

    # -- the router's side ----------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the KV event subscriber is already started")
        self._thread = threading.Thread(target=self._run, name="kv-event-subscriber", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 2.0) -> None:
        """Stop the thread and close every socket; the index keeps what it has."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("KV event subscriber thread did not stop within %.1f s", timeout)
                return
        self._run_commands()
        for feed in list(self._feeds.values()):
            self._close_feed(feed)

    def __enter__(self) -> KVEventSubscriber:
        if self._thread is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_worker(
        self,
        worker_id: Hashable,
        endpoint: str,
        replay_endpoint: str | None = None,
        topic: str = "",
    ) -> None:
        """Read `worker_id`'s events from `endpoint` (a worker already known is re-read
        from scratch). Returns once the sockets are connected when the thread runs."""
        for name, value in (("endpoint", endpoint), ("replay endpoint", replay_endpoint)):
            if value is not None and "*" in value:
                raise ValueError(
                    f"KV events {name} {value!r} of worker {worker_id!r} is a bind address; "
                    "give the address the router connects to, e.g. tcp://10.0.0.5:5557"
                )
        self._submit(lambda: self._open_feed(worker_id, endpoint, replay_endpoint, topic.encode("utf-8")))

    def remove_worker(self, worker_id: Hashable) -> None:
        """Stop reading `worker_id` and drop its blocks from the index."""
        self._submit(lambda: self._retire(worker_id))

    def counters(self, worker_id: Hashable | None = None) -> SubscriberCounters:
        """A copy of the counters of one worker, or of all (removed workers included)."""
        with self._counters_lock:
            if worker_id is not None:
                feed = self._feeds.get(worker_id)
                return SubscriberCounters(**vars(feed.counters)) if feed else SubscriberCounters()
            total = SubscriberCounters(**vars(self._retired))
            for feed in self._feeds.values():
                total.add(feed.counters)
            return total

    def _submit(self, command: Callable[[], None]) -> None:
        done = threading.Event()
        self._commands.put((command, done))
        if (
            self._thread is not None
            and self._thread.is_alive()
            and threading.current_thread() is not self._thread
        ):
            if not done.wait(5.0):
                logger.warning("KV event subscriber thread is slow to take a command")

    # -- the thread -----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._run_commands()
                if self._by_socket:
                    ready = dict(self._poller.poll(_POLL_MS))
                else:  # zmq's poll returns at once with no sockets: wait instead of spinning
                    self._stopping.wait(_POLL_MS / 1000)
                    ready = {}
                for socket in ready:
                    feed = self._by_socket.get(socket)
                    if feed is None:
                        continue
                    if socket is feed.sub:
                        self._read_live(feed)
                    else:
                        self._read_replay(feed)
                self._check_replay_deadlines()
        except zmq.ContextTerminated:
            pass  # the process is shutting down
        except Exception:
            logger.exception("KV event subscriber thread failed; the prefix index stops updating")

    def _run_commands(self) -> None:
        while True:
            try:
                command, done = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                command()
            except Exception:
                logger.exception("KV event subscriber command failed")
            finally:
                done.set()

    def _open_feed(
        self, worker_id: Hashable, endpoint: str, replay_endpoint: str | None, topic: bytes
    ) -> None:
        self._retire(worker_id)
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, topic)
        sub.connect(endpoint)
        feed = _Feed(worker_id, endpoint, replay_endpoint, topic, sub)
        with self._counters_lock:
            self._feeds[worker_id] = feed
        self._by_socket[sub] = feed
        self._poller.register(sub, zmq.POLLIN)
        self._open_dealer(feed)

    def _open_dealer(self, feed: _Feed) -> None:
        if feed.replay_endpoint is None:
            return
        feed.dealer = self._ctx.socket(zmq.DEALER)
        feed.dealer.connect(feed.replay_endpoint)
        self._by_socket[feed.dealer] = feed
        self._poller.register(feed.dealer, zmq.POLLIN)

    def _close_dealer(self, feed: _Feed) -> None:
        # A fresh DEALER after a timeout or a restart, so a stale answer never arrives later.
        if feed.dealer is None:
            return
        self._poller.unregister(feed.dealer)
        del self._by_socket[feed.dealer]
        feed.dealer.close(linger=0)
        feed.dealer = None

    def _close_feed(self, feed: _Feed) -> None:
        self._close_dealer(feed)
        self._poller.unregister(feed.sub)
        del self._by_socket[feed.sub]
        feed.sub.close(linger=0)
        with self._counters_lock:
            self._feeds.pop(feed.worker_id, None)
            self._retired.add(feed.counters)

    def _retire(self, worker_id: Hashable) -> None:
        feed = self._feeds.get(worker_id)
        if feed is not None:
            self._close_feed(feed)
        self.index.remove_worker(worker_id)

    # -- reading the streams ----------------------------------------------------------------

    def _read_live(self, feed: _Feed) -> None:
        for _ in range(_MAX_MESSAGES_PER_WAKE):
            try:
                frames = feed.sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 3 or len(frames[1]) != 8:
                feed.counters.malformed += 1
                continue
            seq = int.from_bytes(frames[1], "big")
            feed.counters.batches_received += 1
            if seq <= feed.max_live_seq:
                self._restart(feed)
            feed.max_live_seq = seq
            self._take(feed, seq, self._decode(feed, frames[2]))

    def _read_replay(self, feed: _Feed) -> None:
        assert feed.dealer is not None
        for _ in range(_MAX_MESSAGES_PER_WAKE):
            try:
                frames = feed.dealer.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            # [b"", topic, seq8, payload], or [b"", seq8, payload] from older publishers
            body = frames[1:] if frames and frames[0] == b"" else frames
            if len(body) == 3:
                body = body[1:]
            if len(body) != 2 or len(body[0]) != 8:
                feed.counters.malformed += 1
                continue
            seq = int.from_bytes(body[0], "big", signed=True)
            if seq == _END_OF_REPLAY:
                self._replay_ended(feed)
                continue
            if seq < 0:
                feed.counters.malformed += 1
                continue
            feed.counters.replayed_batches += 1
            feed.replay_max_seq = max(feed.replay_max_seq, seq)
            self._take(feed, seq, self._decode(feed, body[1]))

    def _replay_ended(self, feed: _Feed) -> None:
        feed.replay_deadline = None
        if not feed.waiting:
            return
        assert feed.next_seq is not None
        if 0 <= feed.replay_max_seq < feed.next_seq:
            # everything the worker sent is applied, so the batches still missing were
            # published after it answered: ask again (the worker has them now)
            self._ask_replay(feed)
        else:
            # the worker no longer had them (the replay started past them, or was empty)
            self._skip_holes(feed)

    def _decode(self, feed: _Feed, payload: bytes) -> KVEventBatch | None:
        try:
            return decode_batch(payload)
        except ValueError as exc:
            feed.counters.malformed += 1
            if feed.counters.malformed == 1:
                logger.warning("malformed KV event batch from worker %r skipped: %s", feed.worker_id, exc)
            return None

    def _take(self, feed: _Feed, seq: int, batch: KVEventBatch | None) -> None:
        """Apply batch `seq` if it is the next one, keep it if it comes early, drop it if old.

        A malformed batch (None) still uses up its seq, so it does not look like a gap.
        """
        if feed.next_seq is None:
            feed.next_seq = 0
        if seq < feed.next_seq or seq in feed.waiting:
            feed.counters.duplicates += 1
            return
        if seq > feed.next_seq:
            feed.waiting[seq] = batch
            if feed.replay_deadline is None:
                feed.counters.gaps_detected += 1
                self._ask_replay(feed)
            elif len(feed.waiting) > self.max_waiting_batches:
                self._skip_holes(feed)
            return
        self._apply(feed, batch)
        feed.next_seq += 1
        self._apply_waiting(feed)

    def _apply(self, feed: _Feed, batch: KVEventBatch | None) -> None:
        if batch is not None:
            self.index.apply_batch(feed.worker_id, batch)
            feed.counters.events_indexed += len(batch.events)

    def _apply_waiting(self, feed: _Feed) -> None:
        assert feed.next_seq is not None
        while feed.next_seq in feed.waiting:
            self._apply(feed, feed.waiting.pop(feed.next_seq))
            feed.next_seq += 1

    def _skip_holes(self, feed: _Feed) -> None:
        """Give up on the missing batches: count them lost and go on with the ones waiting."""
        assert feed.next_seq is not None
        while feed.waiting:
            first = min(feed.waiting)
            feed.counters.lost_batches += first - feed.next_seq
            feed.next_seq = first
            self._apply_waiting(feed)

    def _ask_replay(self, feed: _Feed) -> None:
        assert feed.next_seq is not None
        if feed.dealer is None:
            self._skip_holes(feed)
            return
        feed.dealer.send_multipart([b"", feed.next_seq.to_bytes(8, "big")])
        feed.counters.replay_requests += 1
        feed.replay_max_seq = -1
        feed.replay_deadline = time.monotonic() + self.replay_timeout_s

    def _check_replay_deadlines(self) -> None:
        now = time.monotonic()
        for feed in self._feeds.values():
            if feed.replay_deadline is not None and now > feed.replay_deadline:
                logger.warning(
                    "worker %r did not answer a KV event replay within %.1f s (%s); going on without it",
                    feed.worker_id,
                    self.replay_timeout_s,
                    feed.replay_endpoint,
                )
                feed.counters.replay_timeouts += 1
                feed.replay_deadline = None
                self._close_dealer(feed)
                self._open_dealer(feed)
                self._skip_holes(feed)

    def _restart(self, feed: _Feed) -> None:
        """The worker's publisher started over: forget what it held and read it afresh."""
        logger.info("KV event stream of worker %r restarted; re-indexing it", feed.worker_id)
        feed.counters.restarts += 1
        self.index.remove_worker(feed.worker_id)
        feed.next_seq = None
        feed.max_live_seq = -1
        feed.waiting.clear()
        if feed.replay_deadline is not None:
            feed.replay_deadline = None
            self._close_dealer(feed)
            self._open_dealer(feed)
