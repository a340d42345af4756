"""Triton kernel that writes a step's new K/V rows into the paged cache through a slot mapping.

One program per new token: it stores the token's [num_kv_heads, head_dim] K and V rows at
offset slot % block_size of block slot // block_size, for one layer. Slot -1 (a token
whose K/V must not be kept, e.g. padding of a captured batch) writes nothing. An fp8
cache stores value / scale, saturated to the e4m3 range, like the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from common.attention.reference import FP8_DTYPES, FP8_E4M3_MAX
from common.attention.triton_paged_tiles import next_power_of_2


@triton.jit
def fp8_scaled(x, scale, FP8_MAX: tl.constexpr):
    """x / scale saturated to the e4m3 range, in fp32, ready to store in an fp8 cache: a
    correctly rounded division, so the stored bits equal the reference's x.float() / scale."""
    return tl.clamp(tl.div_rn(x.to(tl.float32), scale), -FP8_MAX, FP8_MAX)


@triton.jit
def _write_kv_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,  # layer's K slice of block 0
    v_cache_ptr,  # layer's V slice of block 0
    slot_mapping_ptr,
    k_scale,
    v_scale,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_block,
    stride_head,
    stride_token,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    FP8: tl.constexpr,
    FP8_MAX: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, D_PAD)
    mask = (heads < NUM_KV_HEADS)[:, None] & (dims < HEAD_DIM)[None, :]
    token = token.to(tl.int64)
    k = tl.load(key_ptr + token * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=mask)
    v = tl.load(value_ptr + token * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=mask)
    if FP8:
        k = fp8_scaled(k, k_scale, FP8_MAX)
        v = fp8_scaled(v, v_scale, FP8_MAX)
    dest = block.to(tl.int64) * stride_block + offset * stride_token
    dest += heads[:, None] * stride_head + dims[None, :]
    tl.store(k_cache_ptr + dest, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dest, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv(
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, D]
    kv_cache: torch.Tensor,  # [N, L, 2, Hkv, BS, D]
    layer: int,
    slot_mapping: torch.Tensor,  # [T] int64, -1 = skip
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    num_tokens, num_kv_heads, head_dim = key.shape
    if key.stride(-1) != 1 or value.stride(-1) != 1 or kv_cache.stride(-1) != 1:
        raise ValueError("key, value and kv_cache must be contiguous in head_dim")
    if (num_kv_heads, head_dim) != (kv_cache.shape[3], kv_cache.shape[5]):
        raise ValueError(
            f"key rows are [{num_kv_heads}, {head_dim}] but the cache holds "
            f"[{kv_cache.shape[3]}, {kv_cache.shape[5]}] per token"
        )
    if num_tokens == 0:
        return
    fp8 = kv_cache.dtype in FP8_DTYPES
    _write_kv_kernel[(num_tokens,)](
        key,
        value,
        kv_cache[:, layer, 0],
        kv_cache[:, layer, 1],
        slot_mapping,
        float(k_scale),
        float(v_scale),
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(3),
        kv_cache.stride(4),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        HEADS_PAD=next_power_of_2(num_kv_heads),
        D_PAD=next_power_of_2(head_dim),
        BLOCK_SIZE=kv_cache.shape[4],
        FP8=fp8,
        FP8_MAX=FP8_E4M3_MAX,
        num_warps=4,
    )
