"""The producer half of a connector: it exports a request's blocks as kv_transfer_params,
keeps them leased until the consumer is done or the lease runs out, and serves the side
channel (a ZMQ ROUTER at kv_ip:kv_port, one thread): handshakes, block reads for the
TCP path, and "done" notices.

Every incoming message is checked; a malformed one gets an error reply and the thread
goes on serving. The thread never touches the worker's state beyond the lease table.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import zmq

from common.advertised_host import advertised_host
from kvtransfer.kv_cache_spec import KVCacheSpec
from kvtransfer.kv_region import KVRegion
from kvtransfer.lease import LeaseTable
from kvtransfer.side_channel import (
    MAX_REQUEST_BYTES,
    DoneRequest,
    HandshakeReply,
    HandshakeRequest,
    MessageError,
    NixlAgentInfo,
    Unauthenticated,
    decode,
    encode,
    error_message,
    get_xid,
    parse_request,
)
from kvtransfer.transfer_params import RemoteBlocks
from kvtransfer.wake_pipe import WakePipe

logger = logging.getLogger(__name__)

MAX_READ_BYTES = 256 << 20  # one read's reply; consumers ask in smaller chunks
NOTIFICATION_POLL_MS = 2


def zmq_address(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


class KVProducer:
    def __init__(
        self,
        *,
        connector_name: str,
        engine_id: str,
        spec: KVCacheSpec,
        host: str,
        port: int,
        advertise_host: str | None = None,
        tp_size: int = 1,
        lease_duration_s: float = 30.0,
    ) -> None:
        self.connector_name = connector_name
        self.engine_id = engine_id
        self.spec = spec
        self.instance_id = uuid.uuid4().hex
        self.tp_size = tp_size
        self.lease_duration_s = lease_duration_s
        self.leases = LeaseTable()
        self._host = host
        self._port = port
        self._advertise_host = advertised_host(host, advertise_host)
        self._region: KVRegion | None = None
        self._nixl: NixlAgentInfo | None = None
        self._cuda_ipc: dict[str, Any] | None = None
        self._notifications: Callable[[], list[str]] | None = None
        self._ctx: zmq.Context | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = WakePipe()
        self.num_exported = 0
        self.num_rejected_messages = 0
        self.num_unauthenticated = 0  # dropped for want of the cluster secret's tag
        self.bytes_served = 0

    # -- worker side ----------------------------------------------------------------

    def start(
        self,
        region: KVRegion,
        nixl: NixlAgentInfo | None = None,
        notifications: Callable[[], list[str]] | None = None,
        cuda_ipc: dict[str, Any] | None = None,
    ) -> None:
        """Bind the side channel and start serving reads of `region`.

        `cuda_ipc`, when given, goes into every handshake reply (CudaIpcConnector's export).

        `notifications`, when given, returns the request ids that consumers reported done
        through the data path; the side channel's thread calls it every few milliseconds
        while blocks are leased (NIXL needs the target to make progress for a READ to
        complete, and the worker's loop may be idle).
        """
        if self._region is not None:
            raise RuntimeError("the KV cache is already registered with this connector")
        self._region = region
        self._nixl = nixl
        self._cuda_ipc = cuda_ipc
        self._notifications = notifications
        self._ctx = zmq.Context()
        router = self._ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES)
        if ":" in self._host:
            router.setsockopt(zmq.IPV6, 1)
        try:
            if self._port == 0:
                self._port = router.bind_to_random_port(zmq_address(self._host, 0).rsplit(":", 1)[0])
            else:
                router.bind(zmq_address(self._host, self._port))
        except zmq.ZMQError as e:
            router.close()
            raise RuntimeError(
                f"cannot open the KV side channel at {zmq_address(self._host, self._port)}: {e}; "
                "give each producer its own kv_port (kv_port 0 picks a free one) and a local kv_ip"
            ) from None
        self._thread = threading.Thread(
            target=self._serve_forever, args=(router,), name="kv-side-channel", daemon=True
        )
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) that consumers reach; the port is known once started."""
        return (self._advertise_host, self._port)

    def export_blocks(self, request_id: str, block_ids: list[int], num_tokens: int) -> dict[str, Any]:
        if self._region is None:
            raise RuntimeError("register_kv_cache() must come before export_blocks()")
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
        bad = [b for b in block_ids if not 1 <= b < self._region.num_blocks]
        if bad:
            raise ValueError(
                f"block ids {bad[:8]} are outside 1..{self._region.num_blocks - 1} "
                "(block 0 is the null block and holds no request's data)"
            )
        self.leases.add(request_id, block_ids, self.lease_duration_s)
        self.num_exported += 1
        if self._notifications is not None:
            self._wake.wake()  # start polling notifications
        host, port = self.address
        return RemoteBlocks(
            engine_id=self.engine_id,
            host=host,
            port=port,
            request_id=request_id,
            block_ids=list(block_ids),
            num_tokens=num_tokens,
            tp_size=self.tp_size,
            expiry_time=time.time() + self.lease_duration_s,
            instance_id=self.instance_id,
        ).to_params()

    def notify(self, request_id: str) -> bool:
        return self.leases.notify(request_id)

    def take_freed_requests(self) -> list[str]:
        return self.leases.take_freed()

    def stats(self) -> dict[str, float]:
        return {
            "num_exported": self.num_exported,
            "num_held": len(self.leases),
            "num_freed_notified": self.leases.num_notified,
            "num_freed_expired": self.leases.num_expired,
            "num_rejected_messages": self.num_rejected_messages,
            "bytes_served": self.bytes_served,
        }

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._wake.wake()
            self._thread.join(timeout=5)
            self._thread = None
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
            self._ctx = None
        self._wake.close()

    # -- the side channel's thread ------------------------------------------------------

    def _serve_forever(self, router: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(self._wake.fileno(), zmq.POLLIN)
        try:
            while not self._stop.is_set():
                polling = self._notifications is not None and len(self.leases) > 0
                events = dict(poller.poll(NOTIFICATION_POLL_MS if polling else None))
                if self._wake.fileno() in events:
                    self._wake.drain()
                if polling:
                    self._take_notifications()
                if router not in events:
                    continue
                while True:
                    try:
                        frames = router.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    identity, rest = frames[0], frames[1:]
                    envelope = [identity, b""] if rest and rest[0] == b"" else [identity]
                    reply = self._answer(rest[len(envelope) - 1 :])
                    if reply:  # none for a message without the cluster secret's tag
                        router.send_multipart(envelope + reply, copy=False)
        except zmq.ContextTerminated:
            pass
        finally:
            router.close(linger=0)

    def _take_notifications(self) -> None:
        try:
            request_ids = self._notifications()
        except Exception:
            logger.exception("reading KV-transfer notifications failed")
            return
        for request_id in request_ids:
            self.leases.notify(request_id)

    def _answer(self, frames: list[bytes]) -> list[Any]:
        """The reply's frames; never raises, so one bad message cannot stop the channel."""
        xid = None
        try:
            if len(frames) != 1:
                raise MessageError(f"expected one message frame, got {len(frames)}")
            message = decode(frames[0])
            xid = get_xid(message)
            return self._handle(parse_request(message, self._region.num_blocks))
        except Unauthenticated as e:
            self.num_rejected_messages += 1
            self.num_unauthenticated += 1
            if self.num_unauthenticated & (self.num_unauthenticated - 1) == 0:  # 1, 2, 4 ...: no log flood
                logger.warning(
                    "dropped %d unauthenticated KV side-channel message(s): %s", self.num_unauthenticated, e
                )
            return []
        except MessageError as e:
            self.num_rejected_messages += 1
            logger.warning("rejected a KV side-channel message: %s", e)
            return [encode(error_message(str(e), xid if xid is not None else e.xid))]
        except Exception as e:
            self.num_rejected_messages += 1
            logger.exception("KV side channel failed on a message")
            return [encode(error_message(f"producer error: {type(e).__name__}: {e}", xid))]

    def _handle(self, request) -> list[Any]:
        region = self._region
        if isinstance(request, HandshakeRequest):
            self._check_compatible(request)
            reply = HandshakeReply(
                engine_id=self.engine_id,
                instance_id=self.instance_id,
                compat_hash=self.spec.compat_hash(),
                kv_spec=self.spec,
                num_blocks=region.num_blocks,
                block_len=region.block_len,
                tp_size=self.tp_size,
                connector=self.connector_name,
                nixl=self._nixl,
                cuda_ipc=self._cuda_ipc,
                xid=request.xid,
            )
            logger.info("KV handshake from engine %s", request.engine_id)
            return [encode(reply.to_message())]
        if isinstance(request, DoneRequest):
            released = self.leases.notify(request.request_id)
            return [encode({"type": "ok", "xid": request.xid, "released": released})]
        # a read: only blocks still leased to the request, never more than one reply's worth
        num_bytes = len(request.block_ids) * region.block_len
        if num_bytes > MAX_READ_BYTES:
            raise MessageError(
                f"a read may return at most {MAX_READ_BYTES} bytes "
                f"({MAX_READ_BYTES // region.block_len} blocks); split the read"
            )
        refusal = self.leases.holds(request.request_id, request.block_ids)
        if refusal is not None:
            raise MessageError(refusal)
        header = {
            "type": "blocks",
            "xid": request.xid,
            "request_id": request.request_id,
            "block_ids": request.block_ids,
        }
        buffers = region.read_blocks(request.block_ids)
        self.bytes_served += num_bytes
        return [encode(header), *buffers]

    def _check_compatible(self, request: HandshakeRequest) -> None:
        if request.compat_hash == self.spec.compat_hash() and request.kv_spec == self.spec:
            return
        differences = self.spec.differences(request.kv_spec) or [
            "the KV cache layout (the two sides run different pdserve releases)"
        ]
        raise MessageError(
            f"incompatible KV cache: {'; '.join(differences)}. Start the prefill and decode "
            "engines with the same model, dtype, --block-size and --kv-cache-dtype"
        )
