"""What two engines must agree on before one reads the other's KV-cache blocks.

A block is read as raw bytes, so a consumer may only pull from a producer whose cache
holds the same model, in the same dtype, with the same geometry. The compatibility hash
covers those fields and the cache layout; the handshake compares it and, on a mismatch,
names the fields that differ.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, fields
from typing import Any

import msgpack

# Part of the hash: a cache laid out differently must never pass for a compatible one.
KV_CACHE_LAYOUT = "blocks,layers,kv,kv_heads,block_size,head_dim/v1"


@dataclass(frozen=True)
class KVCacheSpec:
    """The compatibility fields of one engine's KV cache (one TP rank's tensor).

    `num_kv_heads` counts the heads in this rank's tensor; `dtype` is the model's dtype
    and `cache_dtype` the --kv-cache-dtype ("auto" = the model's dtype).
    """

    model: str
    dtype: str
    num_kv_heads: int
    head_size: int
    num_layers: int
    block_size: int
    cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        for name in ("model", "dtype", "cache_dtype"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"KVCacheSpec.{name} must be a non-empty string, got {value!r}")
        # "torch.bfloat16" and "bfloat16" name the same dtype; hash one spelling
        object.__setattr__(self, "dtype", self.dtype.removeprefix("torch."))
        object.__setattr__(self, "cache_dtype", self.cache_dtype.removeprefix("torch."))
        for name in ("num_kv_heads", "head_size", "num_layers", "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"KVCacheSpec.{name} must be a positive integer, got {value!r}")

    @classmethod
    def from_dict(cls, data: Any) -> KVCacheSpec:
        """Build a spec from a peer's message; ValueError names what is missing or wrong."""
        if not isinstance(data, dict):
            raise ValueError(f"kv_spec must be a map, got {type(data).__name__}")
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in data]
        if missing:
            raise ValueError(f"kv_spec lacks {', '.join(missing)}")
        try:
            return cls(**{n: data[n] for n in names})
        except TypeError as e:
            raise ValueError(f"kv_spec is malformed: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def kv_cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        return (num_blocks, self.num_layers, 2, self.num_kv_heads, self.block_size, self.head_size)

    def compat_hash(self) -> str:
        encoded = msgpack.packb(
            [KV_CACHE_LAYOUT, *(getattr(self, f.name) for f in fields(self))], use_bin_type=True
        )
        return hashlib.sha256(encoded).hexdigest()

    def differences(self, other: KVCacheSpec) -> list[str]:
        """The fields that differ, as "name: <other's> there, <self's> here"."""
        return [
            f"{f.name}: {getattr(other, f.name)!r} there, {getattr(self, f.name)!r} here"
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]
