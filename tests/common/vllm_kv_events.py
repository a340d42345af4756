"""vLLM 0.33's KV-event structs, written from the field list of specs/kv-events.md, and a
reference block hash computed with cbor2: what a stock vLLM consumer or worker does, to
hold pdserve's writer, reader and hashes against.

The structs are declared the way vLLM declares them (msgspec, events tagged by class
name in maps, defaults omitted), so `decode` fails exactly where a vLLM indexer reading
a pdserve worker would: a missing field without a default, a wrong type.
"""

from __future__ import annotations

import hashlib

import cbor2
import msgspec


class KVCacheEvent(msgspec.Struct, array_like=False, omit_defaults=True, gc=False, tag=True):
    pass


class BlockStored(KVCacheEvent):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[list | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None
    lookahead_token_ids: list[list[int]] | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[int | bytes]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]
    data_parallel_rank: int | None = None


_decoder = msgspec.msgpack.Decoder(KVEventBatch)
_encoder = msgspec.msgpack.Encoder()


def decode(payload: bytes) -> KVEventBatch:
    """What a vLLM 0.33 consumer reads from `payload`; msgspec.ValidationError if it cannot."""
    return _decoder.decode(payload)


def encode(batch: KVEventBatch) -> bytes:
    return _encoder.encode(batch)


# -- block hashes as vLLM 0.33's sha256_cbor computes them ----------------------------------


def reference_none_hash(seed: str = "vllm-none-hash") -> bytes:
    return hashlib.sha256(cbor2.dumps(seed, canonical=True)).digest()


def reference_chain(
    token_ids: list[int],
    block_size: int,
    seed: str = "vllm-none-hash",
    cache_salt: str | None = None,
    lora: tuple[str, str] | None = None,
) -> list[bytes]:
    """sha256(cbor2((parent, tuple(block tokens), extra_keys))) block by block, with
    ("lora", name, path) on every block and ("cache_salt", salt) after it on block 0."""
    parent = reference_none_hash(seed)
    hashes = []
    for index, start in enumerate(range(0, len(token_ids) - block_size + 1, block_size)):
        keys = []
        if lora:
            keys.append(("lora", *lora))
        if cache_salt and index == 0:
            keys.append(("cache_salt", cache_salt))
        value = (parent, tuple(token_ids[start : start + block_size]), tuple(keys) or None)
        parent = hashlib.sha256(cbor2.dumps(value, canonical=True)).digest()
        hashes.append(parent)
    return hashes


def int_hash(digest: bytes) -> int:
    """The int form of a digest in vLLM's events: its low 64 bits, big-endian."""
    return int.from_bytes(digest[-8:], "big")
