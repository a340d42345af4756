"""The side channel's messages: msgpack maps between a consumer (DEALER or REQ) and a
producer's ROUTER socket at kv_ip:kv_port. Never pickle.

Each message is one msgpack map with a string "type" and an optional integer "xid" that
the reply echoes, so a consumer may keep several requests in flight on one socket.

consumer -> producer
    handshake  {version, engine_id, compat_hash, kv_spec}    -> handshake reply
    read       {request_id, block_ids}   -> "blocks" {request_id, block_ids}, then one
                                            frame of block_len bytes per block (TCP path)
    done       {request_id}              -> ok: the consumer no longer needs the blocks
producer -> consumer on any failure
    error      {message}

Everything that arrives is checked here (types, sizes, bounds) before anyone uses it;
a check that fails raises MessageError, whose text the producer sends back.

With a cluster secret installed in the process (common/frame_auth.py), every message
frame goes out with an HMAC tag, and one that arrives without a valid tag raises
Unauthenticated: the producer drops it unanswered. The block data frames of a read
reply are not tagged (their header is); docs/security.md says what that means.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from common.frame_auth import SIDE_CHANNEL, FrameRejected, installed_frame_auth
from kvtransfer.kv_cache_spec import KVCacheSpec

PROTOCOL_VERSION = 1
MAX_REQUEST_BYTES = 1 << 20  # requests are small; the ROUTER drops larger ones unread
MAX_ID_CHARS = 512  # request and engine ids
MAX_AGENT_METADATA_BYTES = 64 << 20
MAX_XID = (1 << 63) - 1


class MessageError(ValueError):
    """A side-channel message that breaks the protocol; its text goes back to the sender,
    with the message's xid when it had a usable one."""

    def __init__(self, text: str, xid: int | None = None) -> None:
        super().__init__(text)
        self.xid = xid


class Unauthenticated(MessageError):
    """A frame without a valid cluster-secret tag, or a replayed one: dropped, never answered."""


def encode(message: dict[str, Any]) -> bytes:
    frame = msgpack.packb(message, use_bin_type=True)
    auth = installed_frame_auth(SIDE_CHANNEL)
    return frame if auth is None else auth.seal(frame)


def decode(frame: bytes | memoryview) -> dict[str, Any]:
    auth = installed_frame_auth(SIDE_CHANNEL)
    if auth is not None:
        try:
            frame = auth.open(frame)
        except FrameRejected as e:
            raise Unauthenticated(str(e)) from None
    try:
        message = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several kinds for bad input
        raise MessageError(f"not a msgpack message ({type(e).__name__}: {e})") from None
    if not isinstance(message, dict):
        raise MessageError(f"a message must be a msgpack map, got {type(message).__name__}")
    if not isinstance(message.get("type"), str):
        raise MessageError("a message must have a string field 'type'", get_xid(message))
    return message


def error_message(message: str, xid: int | None = None) -> dict[str, Any]:
    return {"type": "error", "xid": xid, "message": message}


# -- field checks -----------------------------------------------------------------


def get_str(message: dict[str, Any], key: str, max_chars: int = MAX_ID_CHARS) -> str:
    value = message.get(key)
    if not isinstance(value, str):
        raise MessageError(f"field {key!r} must be a string, got {_kind(value)}")
    if not value or len(value) > max_chars:
        raise MessageError(f"field {key!r} must have 1 to {max_chars} characters, got {len(value)}")
    return value


def get_int(message: dict[str, Any], key: str, low: int, high: int) -> int:
    value = message.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise MessageError(f"field {key!r} must be an integer, got {_kind(value)}")
    if not low <= value <= high:
        raise MessageError(f"field {key!r} must be between {low} and {high}, got {value}")
    return value


def get_int_list(message: dict[str, Any], key: str, low: int, high: int, max_items: int) -> list[int]:
    value = message.get(key)
    if not isinstance(value, list):
        raise MessageError(f"field {key!r} must be a list of integers, got {_kind(value)}")
    if len(value) > max_items:
        raise MessageError(f"field {key!r} has {len(value)} items, at most {max_items} allowed")
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int):
            raise MessageError(f"field {key!r} must hold integers only, found {_kind(item)}")
        if not low <= item <= high:
            raise MessageError(f"field {key!r} holds {item}, outside {low}..{high}")
    return value


def get_bytes(message: dict[str, Any], key: str, max_len: int) -> bytes:
    value = message.get(key)
    if not isinstance(value, bytes):
        raise MessageError(f"field {key!r} must be binary, got {_kind(value)}")
    if len(value) > max_len:
        raise MessageError(f"field {key!r} has {len(value)} bytes, at most {max_len} allowed")
    return value


def get_xid(message: dict[str, Any]) -> int | None:
    """The correlation id, or None when absent or unusable (the reply then carries none)."""
    xid = message.get("xid")
    if isinstance(xid, bool) or not isinstance(xid, int) or not 0 <= xid <= MAX_XID:
        return None
    return xid


def get_spec(message: dict[str, Any]) -> KVCacheSpec:
    try:
        return KVCacheSpec.from_dict(message.get("kv_spec"))
    except ValueError as e:
        raise MessageError(str(e)) from None


def _kind(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__


def _handshake(xid: int | None, engine_id: str, compat_hash: str, kv_spec: KVCacheSpec) -> dict[str, Any]:
    """The fields a handshake and its reply share."""
    return {
        "type": "handshake",
        "xid": xid,
        "version": PROTOCOL_VERSION,
        "engine_id": engine_id,
        "compat_hash": compat_hash,
        "kv_spec": kv_spec.to_dict(),
    }


# -- requests -----------------------------------------------------------------------


@dataclass(frozen=True)
class HandshakeRequest:
    engine_id: str
    compat_hash: str
    kv_spec: KVCacheSpec
    xid: int | None = None

    def to_message(self) -> dict[str, Any]:
        return _handshake(self.xid, self.engine_id, self.compat_hash, self.kv_spec)


@dataclass(frozen=True)
class ReadRequest:
    request_id: str
    block_ids: list[int]
    xid: int | None = None

    def to_message(self) -> dict[str, Any]:
        return {"type": "read", "xid": self.xid, "request_id": self.request_id, "block_ids": self.block_ids}


@dataclass(frozen=True)
class DoneRequest:
    request_id: str
    xid: int | None = None

    def to_message(self) -> dict[str, Any]:
        return {"type": "done", "xid": self.xid, "request_id": self.request_id}


def parse_request(message: dict[str, Any], num_blocks: int) -> HandshakeRequest | ReadRequest | DoneRequest:
    """Check a consumer's message against the protocol and a cache of `num_blocks` blocks."""
    kind = message["type"]
    xid = get_xid(message)
    if kind == "handshake":
        version = message.get("version")
        if version != PROTOCOL_VERSION:
            raise MessageError(
                f"side-channel protocol version {version!r} is not supported; this producer "
                f"speaks version {PROTOCOL_VERSION}: run the same pdserve release on both sides"
            )
        spec = get_spec(message)
        return HandshakeRequest(
            get_str(message, "engine_id"), get_str(message, "compat_hash", 128), spec, xid
        )
    if kind == "read":
        block_ids = get_int_list(message, "block_ids", 0, num_blocks - 1, num_blocks)
        return ReadRequest(get_str(message, "request_id"), block_ids, xid)
    if kind == "done":
        return DoneRequest(get_str(message, "request_id"), xid)
    raise MessageError(f"unknown message type {kind[:64]!r}; expected handshake, read or done")


# -- the handshake reply --------------------------------------------------------------


@dataclass(frozen=True)
class NixlAgentInfo:
    """What a consumer needs to READ from a producer's NIXL agent, in plain fields."""

    agent_name: str
    agent_metadata: bytes
    base_addr: int
    device_id: int
    mem_type: str  # "DRAM" or "VRAM"

    def to_message(self) -> dict[str, Any]:
        return {
            "agent_name": self.agent_name,
            "agent_metadata": self.agent_metadata,
            "base_addr": self.base_addr,
            "device_id": self.device_id,
            "mem_type": self.mem_type,
        }

    @classmethod
    def from_message(cls, message: Any) -> NixlAgentInfo:
        if not isinstance(message, dict):
            raise MessageError(f"field 'nixl' must be a map, got {_kind(message)}")
        mem_type = get_str(message, "mem_type", 8)
        if mem_type not in ("DRAM", "VRAM"):
            raise MessageError(f"field 'mem_type' must be DRAM or VRAM, got {mem_type!r}")
        return cls(
            agent_name=get_str(message, "agent_name"),
            agent_metadata=get_bytes(message, "agent_metadata", MAX_AGENT_METADATA_BYTES),
            base_addr=get_int(message, "base_addr", 0, (1 << 64) - 1),
            device_id=get_int(message, "device_id", 0, 1 << 16),
            mem_type=mem_type,
        )


@dataclass(frozen=True)
class HandshakeReply:
    engine_id: str
    instance_id: str  # new at every start of the producer: block ids of an older one mean nothing
    compat_hash: str
    kv_spec: KVCacheSpec
    num_blocks: int
    block_len: int
    tp_size: int
    connector: str
    nixl: NixlAgentInfo | None = None
    cuda_ipc: dict[str, Any] | None = None  # CudaIpcConnector's export, checked by its consumer
    xid: int | None = None

    def to_message(self) -> dict[str, Any]:
        return {
            **_handshake(self.xid, self.engine_id, self.compat_hash, self.kv_spec),
            "instance_id": self.instance_id,
            "num_blocks": self.num_blocks,
            "block_len": self.block_len,
            "tp_size": self.tp_size,
            "connector": self.connector,
            "nixl": None if self.nixl is None else self.nixl.to_message(),
            "cuda_ipc": self.cuda_ipc,
        }

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> HandshakeReply:
        if message["type"] != "handshake":
            raise MessageError(f"expected a handshake reply, got {message['type'][:64]!r}")
        spec = get_spec(message)
        nixl = message.get("nixl")
        cuda_ipc = message.get("cuda_ipc")
        if cuda_ipc is not None and not isinstance(cuda_ipc, dict):
            raise MessageError(f"field 'cuda_ipc' must be a map, got {_kind(cuda_ipc)}")
        reply = cls(
            engine_id=get_str(message, "engine_id"),
            instance_id=get_str(message, "instance_id"),
            compat_hash=get_str(message, "compat_hash", 128),
            kv_spec=spec,
            num_blocks=get_int(message, "num_blocks", 1, 1 << 40),
            block_len=get_int(message, "block_len", 1, 1 << 40),
            tp_size=get_int(message, "tp_size", 1, 1 << 16),
            connector=get_str(message, "connector", 64),
            nixl=None if nixl is None else NixlAgentInfo.from_message(nixl),
            cuda_ipc=cuda_ipc,
            xid=get_xid(message),
        )
        if reply.nixl is not None and reply.nixl.base_addr + reply.num_blocks * reply.block_len >= 1 << 64:
            raise MessageError("the producer's KV region runs past the end of the address space")
        return reply
