"""The consumer's side-channel I/O: one DEALER socket per producer, all driven by one
background thread, so the worker's step loop never waits on the network.

`call()` sends a message and later runs `on_reply(header, frames)` or `on_error(text)`
in the I/O thread: exactly one of them, exactly once (a reply, an error reply, a
timeout, or a lost connection). Connector code runs its own steps in the same thread
with `submit()`, so the state it keeps there needs no locks. A `ticker` runs on every
turn of the loop (the NIXL connector checks its transfers there) and says how soon it
wants the next turn.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from kvtransfer.kv_producer import zmq_address
from kvtransfer.side_channel import MessageError, decode, encode
from kvtransfer.wake_pipe import WakePipe

logger = logging.getLogger(__name__)

Peer = tuple[str, int]
OnReply = Callable[[dict[str, Any], list[zmq.Frame]], None]
OnError = Callable[[str], None]

IDLE_WAKE_S = 0.5  # the loop's longest sleep when nothing is due


@dataclass
class _Call:
    peer: Peer
    on_reply: OnReply
    on_error: OnError
    deadline: float  # time.monotonic()
    timeout_s: float


@dataclass
class _Dealer:
    socket: zmq.Socket
    monitor: zmq.Socket


class PeerLink:
    def __init__(
        self,
        name: str = "kv-peer-link",
        *,
        ticker: Callable[[], float | None] | None = None,
        on_disconnect: Callable[[Peer], None] | None = None,
    ) -> None:
        self._ticker = ticker
        self._on_disconnect = on_disconnect
        self._ctx = zmq.Context()
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake = WakePipe()
        self._xids = itertools.count(1)
        self._calls: dict[int, _Call] = {}
        self._dealers: dict[Peer, _Dealer] = {}
        self._poller = zmq.Poller()
        self._poller.register(self._wake.fileno(), zmq.POLLIN)
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- any thread ---------------------------------------------------------------------

    def submit(self, fn: Callable[[], None]) -> None:
        """Run `fn` in the I/O thread, soon."""
        self._commands.put(fn)
        self._wake.wake()

    def call(
        self,
        peer: Peer,
        message: dict[str, Any],
        on_reply: OnReply,
        on_error: OnError,
        timeout_s: float,
    ) -> None:
        self.submit(lambda: self._send(peer, message, on_reply, on_error, timeout_s))

    def close(self) -> None:
        def stop() -> None:
            self._stop = True

        self.submit(stop)
        self._thread.join(timeout=5)
        for dealer in self._dealers.values():
            dealer.socket.disable_monitor()
            dealer.monitor.close(linger=0)
            dealer.socket.close(linger=0)
        self._dealers.clear()
        self._ctx.destroy(linger=0)
        self._wake.close()

    # -- the I/O thread -------------------------------------------------------------------

    def _send(self, peer: Peer, message: dict[str, Any], on_reply, on_error, timeout_s: float) -> None:
        xid = next(self._xids)
        self._calls[xid] = _Call(peer, on_reply, on_error, time.monotonic() + timeout_s, timeout_s)
        try:
            self._dealer(peer).socket.send(encode({**message, "xid": xid}), zmq.NOBLOCK)
        except zmq.ZMQError as e:
            self._fail(xid, f"cannot send to the producer at {zmq_address(*peer)}: {e}")

    def _dealer(self, peer: Peer) -> _Dealer:
        dealer = self._dealers.get(peer)
        if dealer is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            if ":" in peer[0]:
                sock.setsockopt(zmq.IPV6, 1)
            monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            sock.connect(zmq_address(*peer))
            dealer = self._dealers[peer] = _Dealer(sock, monitor)
            self._poller.register(sock, zmq.POLLIN)
            self._poller.register(monitor, zmq.POLLIN)
        return dealer

    def _run(self) -> None:
        ticker_wait: float | None = None
        while not self._stop:
            try:
                ready = dict(self._poller.poll(self._next_wake_ms(ticker_wait)))
            except zmq.ZMQError:
                if self._stop:
                    break
                raise
            if self._wake.fileno() in ready:
                self._wake.drain()
            while not self._stop:
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    break
                self._guarded(command)
            for peer, dealer in list(self._dealers.items()):
                if dealer.socket in ready:
                    self._receive(dealer.socket)
                if dealer.monitor in ready:
                    self._watch(peer, dealer.monitor)
            self._expire()
            if self._ticker is not None:
                ticker_wait = self._guarded(self._ticker)

    def _next_wake_ms(self, ticker_wait: float | None) -> int:
        wake = IDLE_WAKE_S if ticker_wait is None else min(IDLE_WAKE_S, ticker_wait)
        if self._calls:
            wake = min(wake, min(c.deadline for c in self._calls.values()) - time.monotonic())
        return max(0, int(wake * 1000 + 0.999))

    def _guarded(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception:
            logger.exception("KV transfer I/O step failed")
            return None

    def _receive(self, sock: zmq.Socket) -> None:
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                header = decode(frames[0].buffer)
            except MessageError as e:
                logger.warning("dropped a malformed reply on the KV side channel: %s", e)
                continue
            call = self._calls.pop(header.get("xid"), None) if isinstance(header.get("xid"), int) else None
            if call is None:
                continue  # the call already ended (timed out or failed)
            if header["type"] == "error":
                text = header.get("message")
                self._guarded(lambda c=call, t=text: c.on_error(f"the producer refused: {t}"))
            else:
                self._guarded(lambda c=call, h=header, f=frames[1:]: c.on_reply(h, f))

    def _watch(self, peer: Peer, monitor: zmq.Socket) -> None:
        while True:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] != zmq.EVENT_DISCONNECTED:
                continue
            lost = [xid for xid, c in self._calls.items() if c.peer == peer]
            for xid in lost:
                self._fail(xid, f"lost the connection to the producer at {zmq_address(*peer)}")
            if self._on_disconnect is not None:
                self._guarded(lambda: self._on_disconnect(peer))

    def _expire(self) -> None:
        now = time.monotonic()
        for xid in [x for x, c in self._calls.items() if c.deadline <= now]:
            call = self._calls[xid]
            self._fail(
                xid,
                f"no answer from the producer at {zmq_address(*call.peer)} within {call.timeout_s:.3g} s; "
                "is it running, and are kv_ip/kv_port reachable from here?",
            )

    def _fail(self, xid: int, text: str) -> None:
        call = self._calls.pop(xid, None)
        if call is not None:
            self._guarded(lambda: call.on_error(text))
