"""Pieces shared by the Triton attention kernels: paged K/V tile loads and one online-softmax step.

A (layer, K or V, KV head) slice of block b starts at `base + b * stride_block` and holds
`block_size` rows of `head_dim` contiguous values (DESIGN.md), so a tile of BLOCK_N
consecutive context positions is gathered row by row through the request's block table.
Block ids are widened to int64: block * stride_block passes 2**31 elements on large caches.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634

# Programmatic dependent launch (Hopper and later): the decode-path kernels are launched so
# that the next one's programs may start while this one drains; each waits for its
# predecessor's writes before reading (pdl_wait). On Hopper it took a batch-1 decode step of
# Llama-3-8B shapes from 5.97 to 5.86 ms (docs/benchmarks.md, "Whole-model decode step").
USE_PDL = True


def pdl_enabled(device: torch.device) -> bool:
    """Whether to launch the decode-path kernels with programmatic dependent launch."""
    return USE_PDL and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Under programmatic dependent launch: wait until the previous kernel's writes are
    visible, then let the next kernel's programs start. A no-op otherwise."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@lru_cache(maxsize=8)
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 4 stands in for the interpreter on CPU."""
    if device.type != "cuda":
        return 4
    return _multiprocessor_count(device.index if device.index is not None else torch.cuda.current_device())


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def check_cache_layout(query, kv_cache, layer: int) -> None:
    """Refuse inputs the kernels would silently misread."""
    if kv_cache.dim() != 6:
        raise ValueError(
            f"kv_cache has shape {tuple(kv_cache.shape)}; expected "
            "[num_blocks, num_layers, 2, num_kv_heads, block_size, head_dim]"
        )
    if kv_cache.stride(-1) != 1 or query.stride(-1) != 1:
        raise ValueError("the head dimension of query and kv_cache must be contiguous (stride 1)")
    if not 0 <= layer < kv_cache.shape[1]:
        raise ValueError(f"layer {layer} is outside the cache's {kv_cache.shape[1]} layers")
    num_q_heads, num_kv_heads = query.shape[1], kv_cache.shape[3]
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads is not a multiple of {num_kv_heads} KV heads")
    if query.shape[2] != kv_cache.shape[5]:
        raise ValueError(f"query head_dim {query.shape[2]} differs from the cache's {kv_cache.shape[5]}")


@triton.jit
def load_kv_tile(
    base_ptr,  # this (layer, K|V, head) slice in block 0
    table_ptr,  # this request's block-table row
    token_offs,  # [BLOCK_N] context positions
    dim_offs,  # [D_PAD]
    token_mask,  # [BLOCK_N] bool; ignored unless MASK_TOKENS
    stride_block,
    stride_token,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    EVEN_D: tl.constexpr,  # HEAD_DIM is a power of two, so dim_offs needs no mask
    MASK_TOKENS: tl.constexpr,
):
    """[BLOCK_N, D_PAD] tile of K or V rows; masked rows and padded dims read as 0."""
    if MASK_TOKENS:
        blocks = tl.load(table_ptr + token_offs // BLOCK_SIZE, mask=token_mask, other=0)
    else:
        blocks = tl.load(table_ptr + token_offs // BLOCK_SIZE)
    ptrs = (
        base_ptr
        + blocks.to(tl.int64)[:, None] * stride_block
        + (token_offs % BLOCK_SIZE)[:, None] * stride_token
        + dim_offs[None, :]
    )
    if MASK_TOKENS:
        if EVEN_D:
            tile = tl.load(ptrs, mask=token_mask[:, None], other=0.0)
        else:
            tile = tl.load(ptrs, mask=token_mask[:, None] & (dim_offs < HEAD_DIM)[None, :], other=0.0)
    else:
        if EVEN_D:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=(dim_offs < HEAD_DIM)[None, :], other=0.0)
    return tile


@triton.jit
def softmax_step(q, k, v, acc, m_i, l_i, qk_scale, mask, APPLY_MASK: tl.constexpr):
    """Fold one K/V tile into the running (acc, max, sum) of base-2 online softmax.

    qk_scale already holds softmax scale * k_scale * log2(e); fp8 tiles are widened to the
    query's dtype here, and v_scale is applied once to the final output by the caller.
    """
    if q.dtype == tl.float32:
        # an fp32 model attends in full fp32 (tl.dot's default would round operands to tf32)
        qk = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision="ieee") * qk_scale
    else:
        qk = tl.dot(q, tl.trans(k.to(q.dtype))) * qk_scale
    if APPLY_MASK:
        qk = tl.where(mask, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if q.dtype == tl.float32:
        pv = tl.dot(p, v.to(q.dtype), input_precision="ieee")
    else:
        pv = tl.dot(p.to(q.dtype), v.to(q.dtype))
    acc = acc * alpha[:, None] + pv
    return acc, m_new, l_i


@triton.jit
def rope_rows(x, x_partner, cos, sin, sign):
    """Neox RoPE of x given each element's partner in the other half of its head: x cos + sign
    x_partner sin (sign -1 on the first half, +1 on the second), each product rounded to x's
    dtype and then the sum, as torch's ops in the model's dtype round them. cos/sin fp32, already
    rounded to x's dtype."""
    dtype = x.dtype
    a = (x.to(tl.float32) * cos).to(dtype).to(tl.float32)
    b = (x_partner.to(tl.float32) * sin).to(dtype).to(tl.float32)
    return (a + sign * b).to(dtype)
