"""The router's connection to one worker: a ZMQ DEALER on the router's event loop.

It sends requests and aborts (never blocking: a worker that cannot take a message now
is reported unavailable at once), and one reader task takes everything the worker
sends: token deltas, errors and LoRA results (the answers to load_lora and
unload_lora) go to the open stream of their request id, load reports
to the worker's WorkerState and the pool (docs/disaggregation-flow.md has the flow).
A message for a request nobody waits for any more (aborted, timed out) is dropped; a
malformed one is counted and dropped; neither stops the reader. With the cluster secret
(common/frame_auth.py) every frame is sealed, and one without a valid tag is dropped.

A monitor of the socket tells whether the worker is there at all: when the connection
drops (the worker process exited, was killed, or restarted) or stops answering ZMTP
heartbeats for 5 s (a cut link, a frozen host) every request open on it
fails at once with WorkerLost, and the pool forgets what the worker cached. A worker
that is connected but silent (a long engine step) keeps its requests. `Hello` goes out
on every (re)connection and again while the worker is not reporting, so a worker that
starts after the router, or restarts, learns about it. Torch-free.
"""

from __future__ import annotations

import asyncio
import logging
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass

import zmq
import zmq.asyncio

from common.frame_auth import FrameAuth, FrameRejected
from common.protocol import (
    ErrorMessage,
    Hello,
    LoadReport,
    LoRAResult,
    Message,
    ProtocolError,
    TokenDelta,
    decode_message,
    encode_message,
)
from router.worker_state import WorkerState

logger = logging.getLogger(__name__)

_HEARTBEAT_IVL_MS = 1000
_HEARTBEAT_TIMEOUT_MS = 5000


class WorkerUnavailable(RuntimeError):
    """The worker cannot be reached now (not connected, or its queue is full)."""


class WorkerLost(RuntimeError):
    """The worker stopped answering (or restarted) while a request was open on it."""


@dataclass
class _Lost:
    reason: str


class _Deadline:
    """Put in a stream's queue when a receive() waited too long."""


Answer = TokenDelta | ErrorMessage | LoRAResult  # what a worker says about one request id


class RequestStream:
    """The messages one worker sends about one request, in order."""

    def __init__(self, client: WorkerClient, request_id: str) -> None:
        self.client = client
        self.request_id = request_id
        self._queue: asyncio.Queue[Answer | _Lost | _Deadline] = asyncio.Queue()

    def put(self, item: Answer | _Lost) -> None:
        self._queue.put_nowait(item)

    async def receive(self, timeout_s: float) -> Answer:
        """The next message; WorkerLost if the worker went away, TimeoutError after `timeout_s`.

        The deadline is a marker queued by a timer rather than asyncio.wait_for, which (up to
        Python 3.11) can swallow a cancellation that lands as a message arrives, and so keep
        a request running on its worker after its client left."""
        deadline = _Deadline()
        timer = asyncio.get_running_loop().call_later(timeout_s, self._queue.put_nowait, deadline)
        try:
            while True:
                item = await self._queue.get()
                if item is deadline:
                    raise TimeoutError(f"no message for {timeout_s:g} s")
                if not isinstance(item, _Deadline):  # an earlier receive's, after it got its message
                    break
        finally:
            timer.cancel()
        if isinstance(item, _Lost):
            raise WorkerLost(item.reason)
        return item

    def close(self) -> None:
        self.client.close_stream(self)


class WorkerClient:
    def __init__(
        self,
        state: WorkerState,
        router_id: str,
        context: zmq.asyncio.Context,
        on_load_report: Callable[[WorkerClient, LoadReport], None] | None = None,
        on_disconnect: Callable[[WorkerClient], None] | None = None,
        auth: FrameAuth | None = None,
    ) -> None:
        """`auth` (the cluster secret): every message goes out sealed, and one from the
        worker without a valid tag is dropped and counted in `num_unauthenticated`."""
        self.state = state
        self.auth = auth
        self.num_unauthenticated = 0
        self.router_id = router_id
        self._ctx = context
        self._on_load_report = on_load_report
        self._on_disconnect = on_disconnect
        self._socket: zmq.asyncio.Socket | None = None
        self._monitor: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.connected = False  # the transport is up (the worker process is there)
        self._streams: dict[str, RequestStream] = {}
        self.last_report: LoadReport | None = None
        self.hello_sent_at = -math.inf
        self.num_malformed = 0
        self.num_unclaimed = 0  # messages for requests no longer open here

    @property
    def worker_id(self) -> str:
        return self.state.worker_id

    @property
    def num_open_streams(self) -> int:
        return len(self._streams)

    async def start(self) -> None:
        socket = self._ctx.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        # queue nothing for a worker that is not connected: sending fails at once instead
        socket.setsockopt(zmq.IMMEDIATE, 1)
        socket.setsockopt(zmq.RECONNECT_IVL, 100)
        socket.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        # ZMTP heartbeats, answered by the worker's I/O thread even during a long engine step:
        # a worker that cannot be reached at all (a cut link, a frozen host) counts as gone
        # after HEARTBEAT_TIMEOUT, like one whose connection closed
        socket.setsockopt(zmq.HEARTBEAT_IVL, _HEARTBEAT_IVL_MS)
        socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, _HEARTBEAT_TIMEOUT_MS)
        self._monitor = socket.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        socket.connect(self.state.address)
        self._socket = socket
        self._tasks = [
            asyncio.create_task(self._read(), name=f"worker-reader-{self.worker_id}"),
            asyncio.create_task(self._watch_connection(), name=f"worker-monitor-{self.worker_id}"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self.fail_streams("the router is shutting down")
        if self._socket is not None:
            self._socket.disable_monitor()
            self._socket.close(linger=0)
            self._socket = None
        if self._monitor is not None:
            self._monitor.close(linger=0)
            self._monitor = None

    # -- sending ----------------------------------------------------------------------

    def send(self, message: Message) -> None:
        """Send without waiting; WorkerUnavailable when the worker cannot take it now."""
        if self._socket is None:
            raise WorkerUnavailable(f"worker {self.worker_id} is not connected (the router is not started)")
        payload = encode_message(message)
        if self.auth is not None:
            payload = self.auth.seal(payload)
        future = self._socket.send(payload, zmq.NOBLOCK)
        error = future.exception() if future.done() else None
        if isinstance(error, zmq.Again):
            raise WorkerUnavailable(
                f"worker {self.worker_id} at {self.state.address} is not connected or not keeping up; "
                "check that it is running"
            )
        if error is not None:
            raise WorkerUnavailable(f"sending to worker {self.worker_id} failed: {error}")

    def send_hello(self) -> bool:
        """Introduce the router; False when the worker is not reachable yet (tried again later)."""
        self.hello_sent_at = asyncio.get_running_loop().time()
        try:
            self.send(Hello(router_id=self.router_id))
        except WorkerUnavailable:
            return False
        return True

    # -- request streams ----------------------------------------------------------------

    def open_stream(self, request_id: str) -> RequestStream:
        if request_id in self._streams:
            raise ValueError(f"request {request_id!r} is already open on worker {self.worker_id}")
        stream = RequestStream(self, request_id)
        self._streams[request_id] = stream
        return stream

    def close_stream(self, stream: RequestStream) -> None:
        if self._streams.get(stream.request_id) is stream:
            del self._streams[stream.request_id]

    def fail_streams(self, reason: str) -> None:
        """Every open request fails with WorkerLost(reason): the worker will not answer them."""
        for stream in list(self._streams.values()):
            stream.put(_Lost(reason))

    # -- the connection ----------------------------------------------------------------------

    async def _watch_connection(self) -> None:
        assert self._monitor is not None
        while True:
            try:
                frames = await self._monitor.recv_multipart()
            except zmq.ZMQError:
                return
            if len(frames) != 2 or len(frames[0]) != 6:
                continue
            event, _ = struct.unpack("=hi", frames[0])
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.connected = True
                self.send_hello()
            elif event == zmq.EVENT_DISCONNECTED and self.connected:
                self.connected = False
                logger.warning("the connection to worker %s closed", self.worker_id)
                self.fail_streams(
                    f"the connection to worker {self.worker_id} closed while the request ran there "
                    "(the worker exited, was killed or restarted)"
                )
                if self._on_disconnect is not None:
                    self._on_disconnect(self)

    # -- receiving ------------------------------------------------------------------------

    async def _read(self) -> None:
        assert self._socket is not None
        while True:
            try:
                frames = await self._socket.recv_multipart()
            except zmq.ZMQError as exc:
                if exc.errno in (zmq.ENOTSOCK, zmq.ETERM):
                    return
                logger.warning("receiving from worker %s failed: %s", self.worker_id, exc)
                await asyncio.sleep(0.1)
                continue
            try:
                self._dispatch(frames)
            except Exception:  # a bug here must not stop the reader
                logger.exception("handling a message from worker %s failed", self.worker_id)

    def _dispatch(self, frames: list[bytes]) -> None:
        payload = frames[-1] if frames else b""
        if self.auth is not None:
            try:
                payload = self.auth.open(payload)
            except FrameRejected as exc:
                self.num_unauthenticated += 1
                if self.num_unauthenticated & (self.num_unauthenticated - 1) == 0:  # 1, 2, 4, 8 ...
                    logger.warning("dropped %d unauthenticated message(s) from worker %s; the latest: %s",
                                   self.num_unauthenticated, self.worker_id, exc)  # fmt: skip
                return
        try:
            message = decode_message(payload)
        except ProtocolError as exc:
            self.num_malformed += 1
            if self.num_malformed == 1:
                logger.warning("malformed message from worker %s dropped: %s", self.worker_id, exc)
            return
        if isinstance(message, TokenDelta | ErrorMessage | LoRAResult):
            stream = self._streams.get(message.request_id)
            if stream is None:
                self.num_unclaimed += 1
                return
            stream.put(message)
        elif isinstance(message, LoadReport):
            self._take_load_report(message)
        else:
            self.num_malformed += 1  # requests and aborts go to workers, not from them

    def _take_load_report(self, report: LoadReport) -> None:
        """A report, checked field by field when it was decoded, is the worker's load as it is."""
        self.state.update_load(report)
        if self._on_load_report is not None:
            self._on_load_report(self, report)
        self.last_report = report
