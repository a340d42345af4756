"""A scripted stand-in for a prefill or decode worker, for the router's HTTP tests only.

It speaks the real protocol (common/protocol.py) on a ZMQ ROUTER socket in its own
thread: load reports to every router that said Hello, and for each GenerateRequest the
token ids its `script` gives, one per tick, as docs/disaggregation-flow.md describes
(a prefill_only request gets the first token and kv_transfer_params; a request with
kv_transfer_params continues from the second token). It records every message it
receives, so tests can check what the router sent. Knobs make it fail: answer with an
error, stop halfway with one, go silent for a while (a long step), or stop (its socket
closes, as when the process dies).
The end-to-end tests use the real workers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq

from common.protocol import (
    Abort,
    ErrorMessage,
    GenerateRequest,
    Hello,
    LoadReport,
    TokenDelta,
    decode_message,
    encode_message,
)
from tests.harness.stack import free_port

EOS = 2


@dataclass
class _Running:
    identity: bytes
    request: GenerateRequest
    tokens: list[int]
    next_index: int
    finish_reason: str


@dataclass
class FakeWorker:
    role: str = "decode"
    # prompt token ids -> the token ids it generates (before max_tokens cuts them)
    script: Callable[[list[int]], list[int]] = field(default=lambda prompt: [EOS])
    token_interval_s: float = 0.01
    report_interval_s: float = 0.1
    # LoadReport fields beyond the load it reports (kv_events_endpoint, block_size ...)
    info: dict[str, Any] = field(default_factory=dict)
    # answer every request with this error instead of tokens
    error: tuple[int, str] | None = None
    # after this many tokens of a request, answer an error (500) instead of the rest
    error_after_tokens: int | None = None
    # never answer prefill_only requests (a prefill that takes forever)
    hold_prefill: bool = False
    engine_id: str = "fake-engine"

    def __post_init__(self) -> None:
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.received: list[Any] = []
        self.silent = False  # True: requests are taken but no reports or tokens go out (busy)
        self._routers: set[bytes] = set()
        self._running: dict[str, _Running] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- what tests use ------------------------------------------------------------------

    def start(self) -> FakeWorker:
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), daemon=True, name=f"fake-{self.role}"
        )
        self._thread.start()
        ready.wait(5)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def restart(self) -> None:
        """Act as a new instance: a new engine id, and the requests it ran are gone."""
        self.engine_id = f"{self.engine_id}-restarted"
        self._running.clear()

    def messages(self, kind: type) -> list[Any]:
        with self._lock:
            return [m for m in self.received if isinstance(m, kind)]

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.01)
        return predicate()

    # -- the thread -----------------------------------------------------------------------

    def _run(self, ready: threading.Event) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(self.address)
        ready.set()
        next_report = 0.0
        next_token = 0.0
        try:
            while not self._stop.is_set():
                while sock.poll(2):
                    frames = sock.recv_multipart()
                    self._take(sock, frames[0], frames[-1])
                if self.silent:
                    continue
                now = time.monotonic()
                if now >= next_report:
                    next_report = now + self.report_interval_s
                    self._report(sock)
                if now >= next_token:
                    next_token = now + self.token_interval_s
                    self._emit(sock)
        finally:
            sock.close(0)
            ctx.term()

    def _send(self, sock: zmq.Socket, identity: bytes, message: Any) -> None:
        sock.send_multipart([identity, encode_message(message)])

    def _take(self, sock: zmq.Socket, identity: bytes, payload: bytes) -> None:
        message = decode_message(payload)
        with self._lock:
            self.received.append(message)
        if isinstance(message, Hello):
            self._routers.add(identity)
            self._report(sock)
        elif isinstance(message, Abort):
            running = self._running.pop(message.request_id, None)
            if running is not None:
                self._send(sock, identity, TokenDelta(message.request_id, [], finish_reason="abort"))
        elif isinstance(message, GenerateRequest):
            self._start(sock, identity, message)

    def _start(self, sock: zmq.Socket, identity: bytes, request: GenerateRequest) -> None:
        rid = request.request_id
        if self.error is not None:
            self._send(sock, identity, ErrorMessage(rid, *self.error))
            return
        params = request.sampling()
        tokens = list(self.script(request.prompt_token_ids))[: params.max_tokens]
        finish = "stop" if tokens and tokens[-1] == EOS else "length"
        if request.prefill_only:
            if self.hold_prefill:
                return
            done = len(tokens) == 1
            self._send(
                sock,
                identity,
                TokenDelta(
                    rid,
                    tokens[:1],
                    logprobs=_logprobs(tokens[:1], params.logprobs),
                    finish_reason=finish if done else None,
                    num_prompt_tokens=len(request.prompt_token_ids),
                    kv_transfer_params=None
                    if done
                    else {"remote_engine_id": self.engine_id, "remote_block_ids": [0], "num_tokens": 1},
                ),
            )
            return
        first = 1 if request.kv_transfer_params is not None else 0
        self._running[rid] = _Running(identity, request, tokens, first, finish)

    def _emit(self, sock: zmq.Socket) -> None:
        for rid, running in list(self._running.items()):
            index = running.next_index
            if self.error_after_tokens is not None and index >= self.error_after_tokens:
                del self._running[rid]
                self._send(
                    sock, running.identity, ErrorMessage(rid, 500, "the fake worker failed on purpose")
                )
                continue
            token = running.tokens[index : index + 1]
            running.next_index += 1
            last = running.next_index >= len(running.tokens)
            if last:
                del self._running[rid]
            self._send(
                sock,
                running.identity,
                TokenDelta(
                    rid,
                    token,
                    logprobs=_logprobs(token, running.request.sampling().logprobs),
                    finish_reason=running.finish_reason if last else None,
                    num_prompt_tokens=len(running.request.prompt_token_ids),
                ),
            )

    def _report(self, sock: zmq.Socket) -> None:
        if self.silent:
            return
        for identity in self._routers:
            self._send(
                sock,
                identity,
                LoadReport(
                    worker_id=f"fake-{self.role}-{self.port}",
                    role=self.role,
                    engine_id=self.engine_id,
                    num_running=len(self._running),
                    **self.info,
                ),
            )


def _logprobs(tokens: list[int], k: int | None) -> list[list[Any]] | None:
    if k is None:
        return None
    return [[t, -0.25, 1, [[t, -0.25], *[[t + j, -1.0 - j] for j in range(1, k)]][:k]] for t in tokens]
