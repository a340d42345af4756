"""The serving loop both worker roles share: an LLMEngine behind a ZMQ ROUTER socket.

One thread does everything, in turns: read what the routers sent (generate, abort,
hello, load_lora, unload_lora), run one engine step, publish the step's KV events,
update the metrics, send the load reports that are due, and stream a TokenDelta per
request that progressed. While the engine has
work the socket is polled without waiting between steps; while it only waits for KV
pulls it sleeps until the connector wakes it (`set_pull_waker`: a pull landed or failed;
a connector without it is checked every millisecond), and while it holds blocks for
consumers it polls every few milliseconds (the connector reports through `poll()` and
`take_freed_requests()`); idle, it sleeps on the socket until a message or the next load
report is due.

Frames are `[identity, payload]` (docs/disaggregation-flow.md). Every payload goes
through `decode_message`; a malformed one, or a request the engine refuses, is answered
with an ErrorMessage (400 bad input or a LoRA adapter that cannot be loaded, with the
status the engine's LoRAError carries; 503 a failed KV transfer or a worker shutting
down; 500 a bug), and the loop goes on serving. A router's load_lora and unload_lora
(/v1/load_lora_adapter, /v1/unload_lora_adapter) are answered with a LoRAResult, on
this thread as everything the engine does; the load reports name the adapters the
engine holds. An engine step that raises fails the requests it held (500), never the
process.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import zmq

from common.engine.engine_stats import EngineStats
from common.engine.llm_engine import LLMEngine
from common.engine.outputs import RequestOutput
from common.frame_auth import FrameAuth, FrameRejected
from common.kv_connector import KVConnector
from common.lora.lora_request import LoRARequest
from common.protocol import (
    MAX_FRAME_BYTES,
    Abort,
    ErrorMessage,
    GenerateRequest,
    Hello,
    LoadLoRA,
    LoRAResult,
    Message,
    ProtocolError,
    TokenDelta,
    UnloadLoRA,
    decode_message,
    encode_message,
)
from common.worker.load_reports import LoadReporter
from common.worker.worker_metrics import WorkerMetrics

logger = logging.getLogger(__name__)

# How long the loop sleeps between checks of a connector while it waits for pulls to land,
# and while it only holds blocks for consumers (their leases end on the consumer's notice).
# A connector with set_pull_waker wakes the loop the moment a pull lands or fails, so its
# poll is only a safety net; one without it is checked every millisecond.
PULL_POLL_S = 0.001  # whole milliseconds: the poller counts in them
PULL_WAKER_POLL_S = 0.05
HELD_POLL_S = 0.05
# The loop's nap when the engine has requests but could not schedule any (no free blocks).
STALLED_POLL_S = 0.01
MAX_MESSAGES_PER_TURN = 1024


@dataclass
class _Stream:
    """A request the worker answers: who asked, and its timings for the metrics."""

    identity: bytes
    arrival: float
    num_prompt_tokens: int
    first_token_at: float | None = None
    last_token_at: float | None = None
    num_tokens: int = 0


class EngineServer:
    def __init__(
        self,
        engine: LLMEngine,
        *,
        address: str,
        reporter: LoadReporter,
        publisher: Any = None,
        metrics: WorkerMetrics | None = None,
        connector: KVConnector | None = None,
        context: zmq.Context | None = None,
        auth: FrameAuth | None = None,
    ) -> None:
        """Bind a ROUTER at `address` (a port of 0 or * picks a free one; see `self.address`).

        `publisher` (a KV-event publisher) gets every step's KV events; `connector` (the
        one attached to the engine) is read for transfer records and counters. With `auth`
        (the cluster secret) every frame goes out sealed, and one that arrives without a
        valid tag is dropped unanswered and counted in `num_unauthenticated`."""
        self.engine = engine
        self.reporter = reporter
        self.publisher = publisher
        self.metrics = metrics
        self.connector = connector
        self._streams: dict[str, _Stream] = {}
        self._stopping = False
        self._progressing = True
        self.num_malformed = 0
        self.num_dropped_sends = 0
        self.auth = auth
        self.num_unauthenticated = 0

        ctx = context if context is not None else zmq.Context.instance()
        self._socket = ctx.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        # a frame past this drops the connection; up to it, decode_message answers an error
        self._socket.setsockopt(zmq.MAXMSGSIZE, 2 * MAX_FRAME_BYTES)
        self._socket.setsockopt(zmq.SNDHWM, 0)  # never drop a token delta for a slow router
        # ...but drop the connection (and what is queued on it) of a router that cannot be
        # reached any more: ZMTP heartbeats, answered by the peers' I/O threads
        self._socket.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        self._socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, 10000)
        bind_address = bindable(address)
        if ":" in bind_address.removeprefix("tcp://").rsplit(":", 1)[0]:
            self._socket.setsockopt(zmq.IPV6, 1)
        try:
            self._socket.bind(bind_address)
        except zmq.ZMQError as e:
            self._socket.close()
            raise ValueError(
                f"cannot bind the worker socket at {address}: {e}; pick a free port with "
                "--worker-address tcp://HOST:PORT (port 0 picks one)"
            ) from None
        self.address: str = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._poller = zmq.Poller()
        self._poller.register(self._socket, zmq.POLLIN)
        self._poller.register(self._wake_r.fileno(), zmq.POLLIN)
        set_pull_waker = getattr(connector, "set_pull_waker", None)
        self._pull_poll_s = PULL_POLL_S
        if set_pull_waker is not None and connector.is_consumer:
            set_pull_waker(self._wake)
            self._pull_poll_s = PULL_WAKER_POLL_S

    # -- lifetime --------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Make run() return after its current turn; safe from a signal handler or a thread."""
        self._stopping = True
        self._wake()

    def _wake(self) -> None:
        """End the loop's current sleep in poll(); safe from any thread."""
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass  # the pipe is full (a wake-up is already there) or closed

    def run(self) -> None:
        """Serve until request_stop(); then fail what is still in flight (503) and return."""
        stats = self.engine.stats()
        while not self._stopping:
            timeout_s = self._poll_timeout(stats)
            ready = dict(self._poller.poll(int(timeout_s * 1000)))
            if self._wake_r.fileno() in ready:
                self._drain_wake()
            if self._socket in ready:
                self._read_messages()
            if self._stopping:
                break
            outputs = self._turn()
            # metrics and load reports first, so they already count what the deltas tell
            stats = self._after_turn()
            self._send_outputs(outputs)
        self._fail_all(503, "the worker is shutting down; send the request again elsewhere")

    def close(self) -> None:
        self._socket.close(linger=0)
        self._wake_r.close()
        self._wake_w.close()

    # -- one turn ------------------------------------------------------------------------------

    def _poll_timeout(self, stats: EngineStats) -> float:
        engine = self.engine
        if engine.has_schedulable_requests():
            wait = 0.0 if self._progressing else STALLED_POLL_S
        elif stats.num_waiting_for_remote_kv:
            wait = self._pull_poll_s
        elif engine.has_kv_transfers():
            wait = HELD_POLL_S
        else:
            wait = float("inf")
        return min(wait, self.reporter.seconds_until_due(stats))

    def _turn(self) -> list[RequestOutput]:
        """One engine step (or only the connector's news while nothing can run): its outputs."""
        engine = self.engine
        try:
            if engine.has_schedulable_requests():
                steps_before = engine.num_steps
                outputs = engine.step()
                self._progressing = bool(outputs) or engine.num_steps != steps_before
                return outputs
            if engine.has_kv_transfers():
                # a landed or failed pull makes its request schedulable: the next turn steps
                # at once, no stalled nap, and hands out a failed one's output
                engine.process_kv_transfers()
                self._progressing = True
        except Exception as e:
            logger.exception("engine step failed; failing the requests in flight")
            self._fail_all(500, f"the engine failed while running the request: {type(e).__name__}: {e}")
        return []

    def _after_turn(self) -> EngineStats:
        stats = self.engine.stats()
        if self.publisher is not None:
            events = self.engine.take_kv_events()
            if events:
                self.publisher.publish(events)
        if self.metrics is not None:
            connector = self.connector
            records = connector.take_transfer_records() if connector is not None else []
            self.metrics.observe_step(stats, records, connector.stats() if connector is not None else {})
            if connector is not None:  # pulls land on a consumer only
                landed = self.engine.take_landed_kv_pulls()
                if landed:
                    self.metrics.observe_kv_pulls(landed, self.engine.kv_block_bytes)
        if self.reporter.routers:  # what the next report says the engine holds
            self.reporter.loras = self.engine.lora_names()
        report = self.reporter.due(stats)
        if report is not None:
            payload = encode_message(report)
            for identity in list(self.reporter.routers):
                self._send_raw(identity, payload)
        return stats

    # -- incoming --------------------------------------------------------------------------

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def _read_messages(self) -> None:
        for _ in range(MAX_MESSAGES_PER_TURN):
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            identity = frames[0]
            if len(frames) != 2:
                self.num_malformed += 1
                if self.auth is None:  # with a secret, who sent it is unknown: no answer
                    self._send(
                        identity,
                        ErrorMessage(
                            "", 400, f"a message is one frame after the identity; got {len(frames) - 1}"
                        ),
                    )
                continue
            payload = self._authenticated(frames[1])
            if payload is not None:
                self._handle(identity, payload)

    def _authenticated(self, frame: bytes) -> bytes | None:
        """The frame's payload; None when it must be dropped (no valid tag, or a replay)."""
        if self.auth is None:
            return frame
        try:
            return self.auth.open(frame)
        except FrameRejected as e:
            self.num_unauthenticated += 1
            # logged sparingly: a stranger must not be able to flood the log
            if self.num_unauthenticated & (self.num_unauthenticated - 1) == 0:
                logger.warning(
                    "dropped %d unauthenticated message(s); the latest: %s", self.num_unauthenticated, e
                )
            return None

    def _handle(self, identity: bytes, frame: bytes) -> None:
        try:
            msg = decode_message(frame)
        except Exception as e:  # ProtocolError, or anything a field's own checks raise
            self.num_malformed += 1
            self._send(identity, ErrorMessage(_request_id_of(frame), 400, f"malformed message: {e}"))
            return
        if isinstance(msg, GenerateRequest):
            self._add(identity, msg)
        elif isinstance(msg, Abort):
            self._send_outputs(self.engine.abort_request(msg.request_id))
        elif isinstance(msg, Hello):
            self.reporter.add_router(identity, msg.router_id)
            self.reporter.loras = self.engine.lora_names()
            self._send(identity, self.reporter.report(self.engine.stats()))
        elif isinstance(msg, LoadLoRA):
            self._send(identity, self._load_lora(msg))
        elif isinstance(msg, UnloadLoRA):
            self._send(identity, self._unload_lora(msg))
        else:
            self._send(
                identity,
                ErrorMessage(
                    msg.request_id,
                    400,
                    "a worker takes generate, abort, hello, load_lora and unload_lora messages, "
                    f"not {msg.TYPE!r}",
                ),
            )

    def _load_lora(self, msg: LoadLoRA) -> LoRAResult:
        try:
            self.engine.load_lora(LoRARequest.from_wire(msg.lora))
        except ValueError as e:  # the engine's LoRAError says what is wrong with the adapter
            return LoRAResult(msg.request_id, False, getattr(e, "status", 400), str(e))
        except Exception as e:
            logger.exception("loading LoRA adapter %r failed", msg.lora.get("name"))
            return LoRAResult(msg.request_id, False, 500, f"the worker failed to load the adapter: {e}")
        return LoRAResult(msg.request_id, True)

    def _unload_lora(self, msg: UnloadLoRA) -> LoRAResult:
        try:
            held = self.engine.unload_lora(msg.lora_name)
        except Exception as e:
            logger.exception("unloading LoRA adapter %r failed", msg.lora_name)
            return LoRAResult(msg.request_id, False, 500, f"the worker failed to unload the adapter: {e}")
        if not held:
            return LoRAResult(
                msg.request_id, False, 404, f"this worker does not hold LoRA adapter {msg.lora_name!r}"
            )
        return LoRAResult(msg.request_id, True)

    def _add(self, identity: bytes, msg: GenerateRequest) -> None:
        rid = msg.request_id
        if not rid:
            self._send(identity, ErrorMessage("", 400, "generate: request_id must not be empty"))
            return
        if rid in self._streams:
            self._send(
                identity,
                ErrorMessage(
                    rid, 400, f"request id {rid!r} is already running here; give every request a unique id"
                ),
            )
            return
        now = time.monotonic()
        try:
            self.engine.add_request(
                rid,
                msg.prompt_token_ids,
                msg.sampling(),
                priority=msg.priority,
                cache_salt=msg.cache_salt,
                arrival_time=now,
                kv_transfer_params=msg.kv_transfer_params,
                prefill_only=msg.prefill_only,
                lora_request=msg.lora_request(),
            )
        except (ValueError, ProtocolError) as e:
            # a LoRAError (its adapter cannot be loaded) carries the status to answer with
            self._send(identity, ErrorMessage(rid, getattr(e, "status", 400), str(e)))
            return
        except Exception as e:
            logger.exception("adding request %s failed", rid)
            self._send(identity, ErrorMessage(rid, 500, f"the worker failed to take the request: {e}"))
            return
        self._streams[rid] = _Stream(identity, now, len(msg.prompt_token_ids))

    # -- outgoing --------------------------------------------------------------------------

    def _send_outputs(self, outputs: Sequence[RequestOutput]) -> None:
        now = time.monotonic()
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.error is not None:
                del self._streams[out.request_id]
                self._send(stream.identity, ErrorMessage(out.request_id, 503, out.error))
                self._observe_finished(stream, "abort", now)
                continue
            if out.new_token_ids:
                self._observe_tokens(stream, len(out.new_token_ids), now)
            elif not out.finished:
                continue
            self._send_raw(stream.identity, encode_delta(out))
            if out.finished:
                del self._streams[out.request_id]
                self._observe_finished(stream, out.finish_reason, now)

    def _fail_all(self, code: int, message: str) -> None:
        streams, self._streams = self._streams, {}
        for rid, stream in streams.items():
            self._send(stream.identity, ErrorMessage(rid, code, message))
        try:
            self.engine.abort_request(list(streams))
        except Exception:
            logger.exception("aborting the failed requests failed too")

    def _send(self, identity: bytes, msg: Message) -> None:
        self._send_raw(identity, encode_message(msg))

    def _send_raw(self, identity: bytes, payload: bytes) -> None:
        try:
            if self.auth is not None:
                payload = self.auth.seal(payload)
            self._socket.send_multipart((identity, payload), zmq.NOBLOCK)
        except zmq.Again:
            self.num_dropped_sends += 1

    # -- metrics --------------------------------------------------------------------------

    def _observe_tokens(self, stream: _Stream, count: int, now: float) -> None:
        if self.metrics is not None:
            if stream.first_token_at is None:
                self.metrics.observe_first_token(now - stream.arrival)
            else:
                self.metrics.observe_inter_token(now - stream.last_token_at)
        if stream.first_token_at is None:
            stream.first_token_at = now
        stream.last_token_at = now
        stream.num_tokens += count

    def _observe_finished(self, stream: _Stream, finish_reason: str | None, now: float) -> None:
        if self.metrics is None:
            return
        decode = None if stream.first_token_at is None else stream.last_token_at - stream.first_token_at
        self.metrics.observe_finished(
            finish_reason=finish_reason,
            e2e_seconds=now - stream.arrival,
            num_prompt_tokens=stream.num_prompt_tokens,
            num_generation_tokens=stream.num_tokens,
            decode_seconds=decode,
        )


def bindable(address: str) -> str:
    """A --worker-address as ZMQ binds it: port 0 becomes *, a free port."""
    base, sep, port = address.rpartition(":")
    if address.startswith("tcp://") and sep and port == "0":
        return f"{base}:*"
    return address


def encode_delta(out: RequestOutput) -> bytes:
    """The TokenDelta telling a router what `out` added, encoded as encode_message does
    (byte for byte) but packed straight from the output: sent for every request every step,
    so no dataclass and no deep copy of its lists on the way."""
    return msgpack.packb(
        {
            "request_id": out.request_id,
            "token_ids": out.new_token_ids,
            "logprobs": _logprob_rows(out),
            "finish_reason": out.finish_reason,
            "stop_reason": out.stop_reason,
            "num_prompt_tokens": out.num_prompt_tokens,
            "num_cached_tokens": out.num_cached_tokens,
            "kv_transfer_params": out.kv_transfer_params,
            "type": TokenDelta.TYPE,
        },
        use_bin_type=True,
    )


def _logprob_rows(out: RequestOutput) -> list[list[Any]] | None:
    if out.new_logprobs is None:
        return None
    return [
        [lp.token_id, lp.logprob, lp.rank, [[token, value] for token, value in lp.top]]
        for lp in out.new_logprobs
    ]


def _request_id_of(frame: bytes) -> str:
    """The request id of a message that failed validation, when one can be read: "" else."""
    if len(frame) > MAX_FRAME_BYTES:
        return ""
    try:
        body = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception:
        return ""
    rid = body.get("request_id") if isinstance(body, dict) else None
    return rid if isinstance(rid, str) and len(rid) <= 1024 else ""
