"""KV-cache events and their msgpack wire format, compatible with vLLM's stream.

See specs/kv-events.md. A batch is the array ``[ts, events, data_parallel_rank]`` (the
rank left out when None); each event is a map tagged by ``"type"``. The writer emits
every field vLLM 0.33 declares without a default (None included), so vLLM's own msgspec
decoder takes our events, and leaves out the defaulted ones while None. The reader
takes vLLM 0.33's optional fields, ignores map keys it does not know (newer writers),
also takes the older array form ``["BlockStored", field, ...]``, and checks the type of
every field it keeps, so a malformed payload is a ValueError, never a crash. Hashes
stay as they came (int or bytes); the router maps bytes to its int form. Torch-free:
the router reads these.
"""

from __future__ import annotations

import math
from dataclasses import KW_ONLY, dataclass, field, fields
from typing import Any

import msgpack

Hash = int | bytes


@dataclass
class BlockStored:
    block_hashes: list[Hash]
    parent_block_hash: Hash | None
    token_ids: list[int]  # every token of those blocks, in order
    block_size: int
    lora_id: int | None = None
    medium: str | None = None  # "GPU" | "CPU" | "STORAGE"
    lora_name: str | None = None
    # vLLM 0.33's optional fields, left off the wire while None
    _: KW_ONLY
    extra_keys: list[list[Any] | None] | None = None  # per block, untagged (block_hash.published_extra_keys)
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None  # "LOCAL" | "REMOTE"
    ownership: str | None = None
    session_id: str | None = None
    lookahead_token_ids: list[list[int]] | None = None


@dataclass
class BlockRemoved:
    block_hashes: list[Hash]
    medium: str | None = None
    _: KW_ONLY
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


@dataclass
class AllBlocksCleared:
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass
class KVEventBatch:
    ts: float  # seconds since the epoch
    events: list[KVEvent] = field(default_factory=list)
    data_parallel_rank: int | None = None


_EVENT_TYPES: dict[str, type] = {cls.__name__: cls for cls in (BlockStored, BlockRemoved, AllBlocksCleared)}
# Fields vLLM 0.33 declares without a default: its msgspec decoder rejects an event that
# lacks one ("Object missing required field"), so a writer always emits them, None or not.
# The others have defaults and are left out when None, as vLLM's omit_defaults does.
_ALWAYS_WRITTEN = {
    "BlockStored": (
        "block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium", "lora_name",
    ),
    "BlockRemoved": ("block_hashes", "medium"),
    "AllBlocksCleared": (),
}  # fmt: skip
# The older array form: the tag, then these fields in declaration order.
_ARRAY_FIELDS = {
    "BlockStored": (*_ALWAYS_WRITTEN["BlockStored"], "extra_keys", "group_idx"),
    "BlockRemoved": ("block_hashes", "medium", "group_idx"),
    "AllBlocksCleared": (),
}


# ---------------------------------------------------------------------------
# writing


def _event_to_map(event: KVEvent) -> dict[str, Any]:
    name = type(event).__name__
    if name not in _EVENT_TYPES:
        raise TypeError(f"not a KV event: {type(event).__name__}")
    out: dict[str, Any] = {"type": name}
    always = _ALWAYS_WRITTEN[name]
    for f in fields(event):
        value = getattr(event, f.name)
        if value is not None or f.name in always:
            out[f.name] = value
    return out


def encode_batch(batch: KVEventBatch) -> bytes:
    """The msgpack payload of one batch."""
    body: list[Any] = [float(batch.ts), [_event_to_map(e) for e in batch.events]]
    if batch.data_parallel_rank is not None:
        body.append(batch.data_parallel_rank)
    return msgpack.packb(body, use_bin_type=True)


# ---------------------------------------------------------------------------
# reading


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_float(value: int | float) -> float:
    try:
        return float(value)
    except OverflowError:
        return math.inf


def _check_hash(value: object, where: str) -> Hash:
    if _is_int(value) or isinstance(value, bytes):
        return value  # type: ignore[return-value]
    raise ValueError(f"{where}: a block hash must be an int or bytes, got {type(value).__name__}")


def _check_optional(value: object, kind: type, where: str) -> Any:
    if value is None:
        return None
    ok = _is_int(value) if kind is int else isinstance(value, kind)
    if not ok:
        raise ValueError(f"{where}: expected {kind.__name__} or null, got {type(value).__name__}")
    return value


def _check_hash_list(value: object, where: str) -> list[Hash]:
    if not isinstance(value, list):
        raise ValueError(f"{where}: expected a list of block hashes, got {type(value).__name__}")
    return [_check_hash(h, where) for h in value]


def _check_extra_keys(value: object) -> list[list[Any] | None] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(entry is None or isinstance(entry, list) for entry in value):
        raise ValueError("BlockStored.extra_keys: expected a list with one list or null per block")
    return value


def _check_lookahead(value: object) -> list[list[int]] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(
        isinstance(ids, list) and all(_is_int(t) for t in ids) for ids in value
    ):
        raise ValueError("BlockStored.lookahead_token_ids: expected a list of lists of ints")
    return value


def _optional_fields(values: dict[str, Any], name: str, kinds: dict[str, type]) -> dict[str, Any]:
    return {key: _check_optional(values.get(key), kind, f"{name}.{key}") for key, kind in kinds.items()}


def _block_stored(values: dict[str, Any]) -> BlockStored:
    token_ids = values["token_ids"]
    if not isinstance(token_ids, list) or not all(_is_int(t) for t in token_ids):
        raise ValueError("BlockStored.token_ids: expected a list of ints")
    block_size = values["block_size"]
    if not _is_int(block_size) or block_size < 1:
        raise ValueError(f"BlockStored.block_size: expected a positive int, got {block_size!r}")
    parent = values.get("parent_block_hash")
    return BlockStored(
        block_hashes=_check_hash_list(values["block_hashes"], "BlockStored.block_hashes"),
        parent_block_hash=None if parent is None else _check_hash(parent, "BlockStored.parent_block_hash"),
        token_ids=token_ids,
        block_size=block_size,
        extra_keys=_check_extra_keys(values.get("extra_keys")),
        lookahead_token_ids=_check_lookahead(values.get("lookahead_token_ids")),
        **_optional_fields(values, "BlockStored", _STORED_OPTIONAL),
    )


def _block_removed(values: dict[str, Any]) -> BlockRemoved:
    return BlockRemoved(
        block_hashes=_check_hash_list(values["block_hashes"], "BlockRemoved.block_hashes"),
        **_optional_fields(values, "BlockRemoved", _REMOVED_OPTIONAL),
    )


# the scalar fields besides the hashes, tokens and block size, with the type each must have
_STORED_OPTIONAL: dict[str, type] = {
    "lora_id": int,
    "medium": str,
    "lora_name": str,
    "group_idx": int,
    "kv_cache_spec_kind": str,
    "kv_cache_spec_sliding_window": int,
    "locality": str,
    "ownership": str,
    "session_id": str,
}
_REMOVED_OPTIONAL: dict[str, type] = {"medium": str, "group_idx": int, "locality": str, "ownership": str}

_BUILDERS = {
    "BlockStored": _block_stored,
    "BlockRemoved": _block_removed,
    "AllBlocksCleared": lambda values: AllBlocksCleared(),
}
_REQUIRED = {
    "BlockStored": ("block_hashes", "token_ids", "block_size"),
    "BlockRemoved": ("block_hashes",),
    "AllBlocksCleared": (),
}


def _decode_event(raw: object, index: int) -> KVEvent:
    where = f"event {index}"
    values: dict[str, Any] = {}
    if isinstance(raw, dict):
        name = raw.get("type")
        values = {k: v for k, v in raw.items() if k != "type"}
    elif isinstance(raw, list) and raw:
        name = raw[0]
        if isinstance(name, str) and name in _EVENT_TYPES:
            # array form: the tag, then the fields in declaration order; fields missing
            # at the end take their defaults, extra trailing ones (newer writers) are ignored
            values = dict(zip(_ARRAY_FIELDS[name], raw[1:], strict=False))
    else:
        raise ValueError(f"{where}: expected a map tagged by 'type' or a tagged array, got {raw!r:.80}")
    if not isinstance(name, str) or name not in _EVENT_TYPES:
        raise ValueError(f"{where}: unknown event type {name!r}; expected one of {', '.join(_EVENT_TYPES)}")
    missing = [k for k in _REQUIRED[name] if k not in values]
    if missing:
        raise ValueError(f"{where}: {name} lacks {', '.join(missing)}")
    return _BUILDERS[name](values)


def decode_batch(payload: bytes) -> KVEventBatch:
    """Parse one msgpack payload; raise ValueError saying what is wrong when it is malformed."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise ValueError(f"a KV event payload must be bytes, got {type(payload).__name__}")
    try:
        body = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise ValueError(f"KV event payload is not valid msgpack: {exc}") from exc
    if not isinstance(body, list) or len(body) not in (2, 3):
        raise ValueError("KV event batch must be an array [ts, events] or [ts, events, data_parallel_rank]")
    ts, raw_events = body[0], body[1]
    rank = body[2] if len(body) == 3 else None
    if not (_is_int(ts) or isinstance(ts, float)) or not math.isfinite(_as_float(ts)):
        raise ValueError(f"KV event batch: ts must be a finite number of seconds, got {ts!r:.80}")
    if not isinstance(raw_events, list):
        raise ValueError(f"KV event batch: events must be an array, got {type(raw_events).__name__}")
    if rank is not None and not _is_int(rank):
        raise ValueError(f"KV event batch: data_parallel_rank must be an int or null, got {rank!r}")
    events = [_decode_event(raw, i) for i, raw in enumerate(raw_events)]
    return KVEventBatch(ts=_as_float(ts), events=events, data_parallel_rank=rank)
