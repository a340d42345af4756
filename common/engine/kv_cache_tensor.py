"""The paged KV cache tensor: its dtype, whose heads it holds, and its allocation.

One tensor per worker (per tensor-parallel rank) shaped
[num_blocks, num_layers, 2, num_kv_heads, block_size, head_dim] (DESIGN.md): one block
of all layers is one contiguous region, so a transfer moves one region per block.
"""

from __future__ import annotations

import torch

_KV_CACHE_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
}


def resolve_kv_cache_dtype(kv_cache_dtype: str | torch.dtype, model_dtype: torch.dtype) -> torch.dtype:
    """--kv-cache-dtype as a torch dtype; "auto" stores K/V in the model's dtype."""
    if isinstance(kv_cache_dtype, torch.dtype):
        return kv_cache_dtype
    if kv_cache_dtype == "auto":
        return model_dtype
    try:
        return _KV_CACHE_DTYPES[kv_cache_dtype]
    except KeyError:
        raise ValueError(
            f"--kv-cache-dtype {kv_cache_dtype!r} is not supported; use auto or one of {', '.join(_KV_CACHE_DTYPES)}"
        ) from None


def cache_model_config(model, model_config):
    """The config whose KV heads this process's cache holds: a tensor-parallel rank's own
    (common/models/parallel_layers.py), else the model's."""
    return getattr(model, "rank_config", model_config)


def allocate_kv_cache(
    model_config, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    cache = torch.empty(
        num_blocks,
        model_config.num_hidden_layers,
        2,
        model_config.num_key_value_heads,
        block_size,
        model_config.head_dim,
        dtype=dtype,
        device=device,
    )
    # Backends never read a slot past a sequence's end (they mask it and zero it), so on
    # CPU the cache is left unwritten: the OS then commits only the pages that K/V reach,
    # and a default 4 GiB cache costs what it holds. On a GPU zeros are cheap (written as
    # bytes, which every dtype, fp8 included, reads as 0).
    if device.type == "cuda":
        cache.view(torch.uint8).zero_()
    return cache
