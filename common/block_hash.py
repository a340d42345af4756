"""Chained block hashes for prefix caching, identical in the router and every worker.

A block's hash is H((parent hash, token ids of the block, extra keys or None)) over full
blocks only; the first block's parent is NONE_HASH = H(seed). The seed is
PYTHONHASHSEED when set, else a fixed string, so every process (and any other
language) computes the same chain. H is one of (--prefix-caching-hash-algo):

- ``sha256``: SHA-256 of canonical msgpack of the value. Canonical means every
  integer, string, byte string and array header in its shortest form (what msgpack
  implementations write by default), byte strings as ``bin``, text as ``str``, tuples
  and lists as arrays, None as nil. (vLLM hashes a pickle here; pickle is never used
  for anything that crosses a process, so pdserve defines it over msgpack.)
- ``sha256_cbor``: SHA-256 of deterministic CBOR (RFC 8949 section 4.2.1) of the value,
  the same bytes as ``cbor2.dumps(value, canonical=True)``, so chains match vLLM's
  ``sha256_cbor`` when both use the same PYTHONHASHSEED.
- ``xxhash`` / ``xxhash_cbor``: the 16-byte xxh3-128 digest of the msgpack / CBOR
  encoding; needs the ``xxhash`` package.

Values may hold None, bools, ints, str, bytes and lists/tuples of those; anything
else is refused, since it would have no canonical encoding. Torch-free.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable, Sequence
from functools import cache, lru_cache

import msgpack

HASH_ALGOS = ("sha256", "sha256_cbor", "xxhash", "xxhash_cbor")
# The seed of NONE_HASH when PYTHONHASHSEED is not set.
DEFAULT_HASH_SEED = "pdserve-prefix-cache-v1"

BlockHash = bytes
HashFn = Callable[[object], bytes]

_UINT64_LIMIT = 1 << 64
_EVENT_HASH_MASK = _UINT64_LIMIT - 1


# ---------------------------------------------------------------------------
# canonical encodings


def _cbor_head(major: int, value: int) -> bytes:
    """A CBOR item head in its shortest form: major type in the top 3 bits, then the argument."""
    prefix = major << 5
    if value < 24:
        return bytes((prefix | value,))
    if value < 0x100:
        return bytes((prefix | 24, value))
    if value < 0x10000:
        return struct.pack(">BH", prefix | 25, value)
    if value < 0x100000000:
        return struct.pack(">BI", prefix | 26, value)
    return struct.pack(">BQ", prefix | 27, value)


def _cbor_encode_into(out: bytearray, value: object) -> None:
    if value is None:
        out.append(0xF6)
    elif value is True:
        out.append(0xF5)
    elif value is False:
        out.append(0xF4)
    elif isinstance(value, int):
        if value >= 0:
            if value < _UINT64_LIMIT:
                out += _cbor_head(0, value)
            else:  # tag 2: unsigned bignum
                out.append(0xC2)
                _cbor_encode_into(out, value.to_bytes((value.bit_length() + 7) // 8, "big"))
        else:
            magnitude = -1 - value
            if magnitude < _UINT64_LIMIT:
                out += _cbor_head(1, magnitude)
            else:  # tag 3: negative bignum
                out.append(0xC3)
                _cbor_encode_into(out, magnitude.to_bytes((magnitude.bit_length() + 7) // 8, "big"))
    elif isinstance(value, (bytes, bytearray)):
        out += _cbor_head(2, len(value))
        out += value
    elif isinstance(value, str):
        data = value.encode("utf-8")
        out += _cbor_head(3, len(data))
        out += data
    elif isinstance(value, (list, tuple)):
        out += _cbor_head(4, len(value))
        for item in value:
            _cbor_encode_into(out, item)
    else:
        raise TypeError(
            f"cannot hash a {type(value).__name__} in a block hash: only None, bool, int, str, "
            "bytes and lists/tuples of those have a canonical encoding"
        )


def cbor_encode(value: object) -> bytes:
    """Deterministic CBOR (RFC 8949 section 4.2.1) of None/bool/int/str/bytes/list/tuple."""
    out = bytearray()
    _cbor_encode_into(out, value)
    return bytes(out)


def _check_msgpack_value(value: object) -> None:
    if value is None or isinstance(value, (bool, str, bytes, bytearray)):
        return
    if isinstance(value, int):
        if not -(1 << 63) <= value < _UINT64_LIMIT:
            raise ValueError(f"integer {value} does not fit msgpack's 64-bit range; use a *_cbor hash algo")
        return
    if isinstance(value, (list, tuple)):
        if value and all(type(item) is int for item in value):  # token ids: the common case
            _check_msgpack_value(min(value))
            _check_msgpack_value(max(value))
            return
        for item in value:
            _check_msgpack_value(item)
        return
    raise TypeError(
        f"cannot hash a {type(value).__name__} in a block hash: only None, bool, int, str, "
        "bytes and lists/tuples of those have a canonical encoding"
    )


def msgpack_encode(value: object) -> bytes:
    """Canonical msgpack (shortest forms, bin for bytes) of None/bool/int/str/bytes/list/tuple."""
    _check_msgpack_value(value)
    return msgpack.packb(value, use_bin_type=True)


# ---------------------------------------------------------------------------
# hash functions


def _sha256_msgpack(value: object) -> bytes:
    return hashlib.sha256(msgpack_encode(value)).digest()


def _sha256_cbor(value: object) -> bytes:
    return hashlib.sha256(cbor_encode(value)).digest()


def _xxh3_128(encode: Callable[[object], bytes]) -> HashFn:
    try:
        import xxhash
    except ImportError as exc:
        raise ValueError(
            "--prefix-caching-hash-algo xxhash/xxhash_cbor needs the xxhash package: "
            "pip install xxhash, or choose sha256 or sha256_cbor"
        ) from exc

    def digest(value: object) -> bytes:
        return xxhash.xxh3_128_digest(encode(value))

    return digest


@cache
def get_hash_fn(algo: str) -> HashFn:
    """The function H of --prefix-caching-hash-algo `algo`: value -> digest bytes."""
    if algo == "sha256":
        return _sha256_msgpack
    if algo == "sha256_cbor":
        return _sha256_cbor
    if algo == "xxhash":
        return _xxh3_128(msgpack_encode)
    if algo == "xxhash_cbor":
        return _xxh3_128(cbor_encode)
    raise ValueError(f"unknown prefix-caching hash algo {algo!r}; choose one of {', '.join(HASH_ALGOS)}")


def hash_seed() -> str:
    """PYTHONHASHSEED when set (and not empty), else DEFAULT_HASH_SEED."""
    return os.environ.get("PYTHONHASHSEED") or DEFAULT_HASH_SEED


@lru_cache(maxsize=16)
def _none_hash(algo: str, seed: str) -> bytes:
    return get_hash_fn(algo)(seed)


def none_hash(algo: str = "sha256") -> bytes:
    """NONE_HASH of `algo`: H(seed), the parent of every chain's first block."""
    return _none_hash(algo, hash_seed())


# ---------------------------------------------------------------------------
# block chains


def hash_block_tokens(
    parent_hash: bytes | None,
    token_ids: Sequence[int],
    extra_keys: Sequence[object] | None = None,
    algo: str = "sha256",
) -> bytes:
    """Hash of one full block: H((parent or NONE_HASH, token ids, extra keys or None)).

    An empty `extra_keys` counts as None, so callers need not tell the two apart.
    """
    parent = parent_hash if parent_hash else none_hash(algo)
    extra = tuple(extra_keys) if extra_keys else None
    return get_hash_fn(algo)((parent, tuple(token_ids), extra))


def hash_request_blocks(
    token_ids: Sequence[int],
    block_size: int,
    algo: str = "sha256",
    cache_salt: str | None = None,
    parent: bytes | None = None,
) -> list[bytes]:
    """Hashes of the full blocks of `token_ids`, chained from `parent`.

    `parent` is the hash of the block just before token_ids[0] when continuing a chain,
    None when token_ids start a request. `cache_salt` is an extra key of the chain's
    first block only, so it applies only when `parent` is None; every later block
    differs through the chain.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    hashes: list[bytes] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        starts_chain = parent is None
        extra = (cache_salt,) if cache_salt and starts_chain else None
        parent = hash_block_tokens(parent, token_ids[start : start + block_size], extra, algo)
        hashes.append(parent)
    return hashes


def event_hash(block_hash: bytes) -> int:
    """The hash as KV events carry it: the low 64 bits of the digest read big-endian, unsigned."""
    return int.from_bytes(block_hash, "big") & _EVENT_HASH_MASK
