"""Publishing a worker's KV-cache events over ZMQ, in vLLM's wire format.

The engine hands each step's events to `publish()`, which only puts them on a bounded
in-process queue and returns; a background thread encodes them (common.kv_events) and
sends one multipart message per batch on a PUB socket:

    [topic, seq (8 bytes, big-endian, unsigned), msgpack payload]

`seq` starts at 0 and grows by one per batch sent. The thread also keeps the last
`buffer_steps` batches and answers replay requests on a ROUTER socket: a client sends
the first seq it wants (8 bytes, big-endian) and gets every buffered batch from there
as `[identity, b"", topic, seq8, payload]`, then the end marker
`[identity, b"", b"", seq8 of -1, b""]`. See specs/kv-events.md.

The engine must never wait on the network, so a full queue drops its oldest batch
(counted in `num_dropped`, logged once) rather than block. Dropped batches never get a
seq, so subscribers cannot see them as a gap; the queue is sized so this only happens
when the publisher thread is starved for a long time. Torch-free.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence

import zmq

from common.config.kv_events_config import KVEventsConfig
from common.kv_events import KVEvent, KVEventBatch, encode_batch

logger = logging.getLogger(__name__)

END_OF_REPLAY_SEQ = (-1).to_bytes(8, "big", signed=True)
# How long the thread waits for a batch before looking at the replay socket again.
_POLL_INTERVAL_S = 0.02
_CLOSE_LINGER_MS = 500


def seq_bytes(seq: int) -> bytes:
    """A batch's sequence number as it travels: 8 bytes, big-endian, unsigned."""
    return seq.to_bytes(8, "big")


def endpoint_for_rank(endpoint: str | None, data_parallel_rank: int | None) -> str | None:
    """The endpoint of data-parallel rank `data_parallel_rank`: the TCP port plus the rank,
    or, for ipc:// and inproc:// addresses, the address with ``_dp{rank}`` appended.

    A wildcard port (``tcp://host:*``) is left alone: the system picks a free port anyway.
    """
    if endpoint is None or not data_parallel_rank:
        return endpoint
    if endpoint.startswith(("ipc://", "inproc://")):
        return f"{endpoint}_dp{data_parallel_rank}"
    if endpoint.startswith("tcp://"):
        base, sep, port = endpoint.rpartition(":")
        if not sep or base == "tcp":
            raise ValueError(f"KV events endpoint {endpoint!r} has no port; write it as tcp://HOST:PORT")
        if port == "*":
            return endpoint
        if not port.isdigit():
            raise ValueError(f"KV events endpoint {endpoint!r} has a bad port {port!r}; use a number or *")
        return f"{base}:{int(port) + data_parallel_rank}"
    raise ValueError(f"KV events endpoint {endpoint!r} must start with tcp://, ipc:// or inproc://")


def binds(endpoint: str) -> bool:
    """Whether a publisher binds `endpoint` (a local wildcard or socket file) or connects to it."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


class NullPublisher:
    """The publisher of ``"publisher": "null"``: events go nowhere."""

    endpoint: str | None = None
    replay_endpoint: str | None = None
    num_published = 0
    num_dropped = 0

    def publish(self, events: Sequence[KVEvent]) -> None:
        pass

    def close(self, timeout: float = 2.0) -> None:
        pass

    def __enter__(self) -> NullPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class KVEventPublisher:
    """Sends KV-event batches on a ZMQ PUB socket from a background thread.

    `endpoint` and `replay_endpoint` are the addresses actually bound or connected
    (with a wildcard port resolved), so callers can advertise them.
    """

    def __init__(
        self,
        config: KVEventsConfig,
        data_parallel_rank: int | None = None,
        context: zmq.Context | None = None,
    ) -> None:
        self._topic = config.topic.encode("utf-8")
        self._data_parallel_rank = data_parallel_rank
        self._queue: queue.Queue[KVEventBatch] = queue.Queue(maxsize=config.max_queue_size)
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=config.buffer_steps)
        self._next_seq = 0
        self._stopping = threading.Event()
        self._closed = False
        self.num_published = 0
        self.num_dropped = 0

        # The sockets are made here so a bad or busy address fails the caller at once;
        # from then on only the thread touches them.
        ctx = context if context is not None else zmq.Context.instance()
        endpoint = endpoint_for_rank(config.endpoint, data_parallel_rank)
        assert endpoint is not None  # the config always has one
        self._pub = ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.SNDHWM, config.hwm)
        self._replay: zmq.Socket | None = None
        try:
            self.endpoint = self._attach(self._pub, endpoint)
            replay_endpoint = endpoint_for_rank(config.replay_endpoint, data_parallel_rank)
            self.replay_endpoint: str | None = None
            if replay_endpoint is not None:
                self._replay = ctx.socket(zmq.ROUTER)
                self._replay.bind(replay_endpoint)
                self.replay_endpoint = self._replay.getsockopt_string(zmq.LAST_ENDPOINT)
        except zmq.ZMQError as exc:
            self._close_sockets(linger=0)
            raise ValueError(
                f"cannot open the KV events sockets ({config.endpoint!r}, replay "
                f"{config.replay_endpoint!r}): {exc}; pick a free port in --kv-events-config"
            ) from exc

        self._thread = threading.Thread(target=self._run, name="kv-event-publisher", daemon=True)
        self._thread.start()

    @staticmethod
    def _attach(socket: zmq.Socket, endpoint: str) -> str:
        if binds(endpoint):
            socket.bind(endpoint)
            return socket.getsockopt_string(zmq.LAST_ENDPOINT)
        socket.connect(endpoint)
        return endpoint

    # -- the engine's side -----------------------------------------------------------

    def publish(self, events: Sequence[KVEvent]) -> None:
        """Queue one step's events as a batch; never blocks. An empty list sends nothing."""
        if not events or self._closed:
            return
        batch = KVEventBatch(ts=time.time(), events=list(events), data_parallel_rank=self._data_parallel_rank)
        while True:
            try:
                self._queue.put_nowait(batch)
                return
            except queue.Full:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    continue  # the thread just made room
                self.num_dropped += 1
                if self.num_dropped == 1:
                    logger.warning(
                        "KV event queue is full (max_queue_size %d): dropping the oldest batches; "
                        "the router's prefix index will miss them. Raise max_queue_size in "
                        "--kv-events-config if this repeats.",
                        self._queue.maxsize,
                    )

    def close(self, timeout: float = 2.0) -> None:
        """Send what is queued, then stop the thread and close the sockets."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("KV event publisher thread did not stop within %.1f s", timeout)

    def __enter__(self) -> KVEventPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                try:
                    batch = self._queue.get(timeout=_POLL_INTERVAL_S)
                except queue.Empty:
                    batch = None
                if batch is not None:
                    self._send(batch)
                    # send what was queued meanwhile, so a replay answered next has it;
                    # bounded, so a busy engine cannot starve the replay socket
                    for _ in range(self._queue.qsize()):
                        try:
                            self._send(self._queue.get_nowait())
                        except queue.Empty:  # publish() dropped the oldest meanwhile
                            break
                if self._replay is not None:
                    while self._replay.poll(0):
                        self._serve_replay()
                if batch is None and self._stopping.is_set():
                    return
        except zmq.ContextTerminated:
            pass  # the process is shutting down
        except Exception:
            logger.exception("KV event publisher thread failed; no more KV events will be sent")
        finally:
            self._close_sockets(linger=_CLOSE_LINGER_MS)

    def _send(self, batch: KVEventBatch) -> None:
        try:
            payload = encode_batch(batch)
        except (TypeError, ValueError, OverflowError) as exc:
            # an event the wire format cannot carry: a bug upstream, but no reason to stop
            self.num_dropped += 1
            logger.error("KV event batch dropped: it cannot be encoded (%s)", exc)
            return
        seq = self._next_seq
        self._next_seq += 1
        self._pub.send_multipart((self._topic, seq_bytes(seq), payload))
        self._buffer.append((seq, payload))
        self.num_published += 1

    def _serve_replay(self) -> None:
        assert self._replay is not None
        frames = self._replay.recv_multipart()
        # From a REQ or a DEALER that mimics one: [identity, b"", seq8]; a bare DEALER may
        # leave the empty delimiter out. Every answer carries it, as vLLM 0.33's does.
        envelope = [frames[0], b""]
        request = frames[2:] if len(frames) == 3 and frames[1] == b"" else frames[1:]
        if len(request) != 1 or len(request[0]) != 8:
            logger.warning("ignoring a malformed KV event replay request of %d frames", len(frames))
            self._replay.send_multipart([*envelope, b"", END_OF_REPLAY_SEQ, b""])
            return
        start = int.from_bytes(request[0], "big")
        for seq, payload in self._buffer:
            if seq >= start:
                self._replay.send_multipart([*envelope, self._topic, seq_bytes(seq), payload])
        self._replay.send_multipart([*envelope, b"", END_OF_REPLAY_SEQ, b""])

    def _close_sockets(self, linger: int) -> None:
        self._pub.close(linger=linger)
        if self._replay is not None:
            self._replay.close(linger=0)


def make_kv_event_publisher(
    config: KVEventsConfig | None,
    data_parallel_rank: int | None = None,
    context: zmq.Context | None = None,
) -> KVEventPublisher | NullPublisher:
    """The publisher `config` asks for: a KVEventPublisher when events are enabled with the
    zmq publisher, else a NullPublisher."""
    if config is None or not config.enable_kv_cache_events or config.publisher == "null":
        return NullPublisher()
    if config.publisher != "zmq":
        raise ValueError(f"unknown KV event publisher {config.publisher!r}; use zmq or null")
    return KVEventPublisher(config, data_parallel_rank, context)
