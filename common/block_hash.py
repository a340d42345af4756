"""Chained block hashes for prefix caching, identical in the router and every worker.

A block's hash is H((parent hash, token ids of the block, extra keys or None)) over full
blocks only; the first block's parent is NONE_HASH = H(seed). The seed follows vLLM
0.33: PYTHONHASHSEED when set, else, for sha256 and sha256_cbor, the fixed string
"vllm-none-hash", so every process (and any other language, and a vLLM worker) computes
the same chain. For xxhash vLLM seeds each process at random; the router must recompute
the workers' hashes, so routers and workers need a shared seed there: PYTHONHASHSEED or
one derived from the cluster secret (require_shared_hash_seed). H is one of
(--prefix-caching-hash-algo):

- ``sha256``: SHA-256 of canonical msgpack of the value. Canonical means every
  integer, string, byte string and array header in its shortest form (what msgpack
  implementations write by default), byte strings as ``bin``, text as ``str``, tuples
  and lists as arrays, None as nil. (vLLM hashes a pickle here; pickle is never used
  for anything that crosses a process, so pdserve defines it over msgpack.)
- ``sha256_cbor``: SHA-256 of deterministic CBOR (RFC 8949 section 4.2.1) of the value,
  ``cbor2.dumps(value, canonical=True)`` as in vLLM, so chains match vLLM's
  ``sha256_cbor`` for the same tokens and extra keys.
- ``xxhash`` / ``xxhash_cbor``: the 16-byte xxh3-128 digest of the msgpack / CBOR
  encoding; needs the ``xxhash`` package.

Extra keys are vLLM 0.33's tagged tuples (block_extra_keys), published untagged in
KV events (published_extra_keys). Values may hold None, bools, ints, str, bytes and
lists/tuples of those; anything else is refused, since it would have no canonical
encoding. Torch-free.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Callable, Sequence
from functools import cache, lru_cache

import msgpack

HASH_ALGOS = ("sha256", "sha256_cbor", "xxhash", "xxhash_cbor")
CRYPTOGRAPHIC_HASH_ALGOS = ("sha256", "sha256_cbor")
# vLLM 0.33's seed of NONE_HASH for the cryptographic algos when PYTHONHASHSEED is not set.
DEFAULT_HASH_SEED = "vllm-none-hash"

BlockHash = bytes
HashFn = Callable[[object], bytes]

_UINT64_LIMIT = 1 << 64
_EVENT_HASH_MASK = _UINT64_LIMIT - 1


# ---------------------------------------------------------------------------
# canonical encodings


def _check_value(value: object) -> None:
    """Refuse what has no canonical encoding here, before an encoder would take it anyway."""
    if value is None or isinstance(value, (bool, int, str, bytes, bytearray)):
        return
    if isinstance(value, (list, tuple)):
        if all(type(item) is int for item in value):  # token ids: the common case
            return
        for item in value:
            _check_value(item)
        return
    raise TypeError(
        f"cannot hash a {type(value).__name__} in a block hash: only None, bool, int, str, "
        "bytes and lists/tuples of those have a canonical encoding"
    )


@cache
def _cbor_dumps() -> Callable[..., bytes]:
    try:
        import cbor2
    except ImportError as exc:
        raise ValueError(
            "--prefix-caching-hash-algo sha256_cbor/xxhash_cbor needs the cbor2 package: "
            "pip install cbor2, or choose sha256"
        ) from exc
    return cbor2.dumps


def cbor_encode(value: object) -> bytes:
    """Deterministic CBOR (RFC 8949 section 4.2.1) of None/bool/int/str/bytes/list/tuple.

    cbor2's canonical mode, as vLLM encodes: its C encoder hashed a 4k-token prompt's
    chain about twice as fast as the Python encoder this module had, for the same bytes.
    """
    _check_value(value)
    return _cbor_dumps()(value, canonical=True)


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

# algo -> (check, encode without checking, digest); the chain checks its inputs once
# and then encodes block after block unchecked
_Encoding = tuple[Callable[[object], None], Callable[[object], bytes], Callable[[bytes], bytes]]


def _msgpack_unchecked(value: object) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _cbor_unchecked(value: object) -> bytes:
    return _cbor_dumps()(value, canonical=True)


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _xxh3_128() -> Callable[[bytes], bytes]:
    try:
        import xxhash
    except ImportError as exc:
        raise ValueError(
            "--prefix-caching-hash-algo xxhash/xxhash_cbor needs the xxhash package: "
            "pip install xxhash, or choose sha256 or sha256_cbor"
        ) from exc
    return xxhash.xxh3_128_digest


@cache
def _encoding(algo: str) -> _Encoding:
    if algo not in HASH_ALGOS:
        raise ValueError(f"unknown prefix-caching hash algo {algo!r}; choose one of {', '.join(HASH_ALGOS)}")
    digest = _xxh3_128() if algo.startswith("xxhash") else _sha256
    if algo.endswith("_cbor"):
        _cbor_dumps()  # a missing cbor2 is an error now, not at the first request
        return _check_value, _cbor_unchecked, digest
    return _check_msgpack_value, _msgpack_unchecked, digest


@cache
def get_hash_fn(algo: str) -> HashFn:
    """The function H of --prefix-caching-hash-algo `algo`: value -> digest bytes."""
    check, encode, digest = _encoding(algo)

    def hash_fn(value: object) -> bytes:
        check(value)
        return digest(encode(value))

    return hash_fn


def cluster_hash_seed(secret: bytes) -> str:
    """The NONE_HASH seed derived from the cluster secret: an HMAC, so the seed (which
    workers may report) never reveals the secret itself."""
    return hmac.new(secret, b"pdserve NONE_HASH seed v1", hashlib.sha256).hexdigest()


# set once per process by the router or a worker (install_cluster_hash_seed)
_cluster_seed: list[str | None] = [None]


def install_cluster_hash_seed(secret: bytes | None) -> None:
    """Seed xxhash chains of this process from the cluster secret when PYTHONHASHSEED is unset."""
    _cluster_seed[0] = None if secret is None else cluster_hash_seed(secret)


def shared_hash_seed(algo: str, cluster_secret: bytes | None = None) -> str | None:
    """The NONE_HASH seed of `algo` that every process of the cluster computes alike, or
    None when there is none (xxhash without PYTHONHASHSEED or a cluster secret).

    vLLM's rule: PYTHONHASHSEED when set; else, for sha256 and sha256_cbor, a fixed
    string. For xxhash vLLM takes random bytes per process; a cluster secret (given here,
    or installed) stands in for them so the router can recompute the workers' hashes.
    """
    seed = os.environ.get("PYTHONHASHSEED")
    if seed:
        return seed
    if algo in CRYPTOGRAPHIC_HASH_ALGOS:
        return DEFAULT_HASH_SEED
    if cluster_secret is not None:
        return cluster_hash_seed(cluster_secret)
    return _cluster_seed[0]


@cache
def _process_seed() -> str:
    return secrets.token_bytes(32).hex()


def hash_seed(algo: str = "sha256") -> str:
    """The seed of NONE_HASH for `algo` in this process: the shared one, else (xxhash alone
    in a process, as vLLM does) random bytes drawn once per process."""
    return shared_hash_seed(algo) or _process_seed()


def require_shared_hash_seed(algo: str, cluster_secret: bytes | None, process: str) -> None:
    """ValueError saying why and what to set when `algo` has no seed shared by the cluster."""
    if shared_hash_seed(algo, cluster_secret) is not None:
        return
    raise ValueError(
        f"--prefix-caching-hash-algo {algo} needs a seed shared by the router and every worker, "
        f"and this {process} has none: without PYTHONHASHSEED each process would seed xxhash's "
        "NONE_HASH with random bytes (vLLM's rule), so the router could never recompute the "
        "workers' block hashes and prefix-aware routing would find nothing. Set the same "
        "PYTHONHASHSEED for the router and every worker, or give them all the same "
        "--cluster-secret-file (the seed is then derived from it), or choose sha256_cbor"
    )


@lru_cache(maxsize=16)
def _none_hash(algo: str, seed: str) -> bytes:
    return get_hash_fn(algo)(seed)


def none_hash(algo: str = "sha256") -> bytes:
    """NONE_HASH of `algo`: H(seed), the parent of every chain's first block."""
    return _none_hash(algo, hash_seed(algo))


# ---------------------------------------------------------------------------
# extra keys


ExtraKey = tuple  # ("lora", name, path) | ("mm", identifier, offset) | ("cache_salt", salt) | ...


def block_extra_keys(
    block_index: int,
    cache_salt: str | None = None,
    lora: tuple[str, str] | None = None,
) -> tuple[ExtraKey, ...] | None:
    """The extra keys of block `block_index` of a request, tagged and ordered as vLLM 0.33
    hashes them: ("lora", name, path) on every block of a LoRA request, then
    ("cache_salt", salt) on block 0 only; None when there are none. (vLLM puts
    ("mm", identifier, offset) keys between the two and ("prompt_embeds", digest) last.)
    """
    keys: list[ExtraKey] = []
    if lora is not None:
        keys.append(("lora", lora[0], lora[1]))
    if cache_salt and block_index == 0:
        keys.append(("cache_salt", cache_salt))
    return tuple(keys) if keys else None


def published_extra_keys(keys: Sequence[ExtraKey] | None) -> list[object] | None:
    """A block's extra keys as KV events carry them, untagged: [identifier, offset] for a
    multimodal key, the one value for the others; None when there are none."""
    if not keys:
        return None
    return [list(key[1:]) if key[0] == "mm" else key[1] for key in keys]


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
    lora: tuple[str, str] | None = None,
) -> list[bytes]:
    """Hashes of the full blocks of `token_ids`, chained from `parent`.

    `parent` is the hash of the block just before token_ids[0] when continuing a chain,
    None when token_ids start a request. Extra keys follow block_extra_keys: `lora`
    (adapter name, path) on every block, `cache_salt` on the chain's first block only, so
    the salt applies only when `parent` is None; every later block differs through the chain.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    check, encode, digest = _encoding(algo)
    lora_keys = block_extra_keys(1, None, lora)  # the keys of every block after block 0
    first_keys = block_extra_keys(0, cache_salt, lora) if parent is None else lora_keys
    if parent is None:
        parent = none_hash(algo)
    check((parent, tuple(token_ids), first_keys))  # once, not per block
    hashes: list[bytes] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        extra = lora_keys if hashes else first_keys
        parent = digest(encode((parent, tuple(token_ids[start : start + block_size]), extra)))
        hashes.append(parent)
    return hashes


def event_hash(block_hash: bytes) -> int:
    """The hash as KV events carry it: the low 64 bits of the digest read big-endian, unsigned."""
    return int.from_bytes(block_hash, "big") & _EVENT_HASH_MASK
