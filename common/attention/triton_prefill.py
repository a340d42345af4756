"""Triton chunked-prefill attention over the paged cache.

The new tokens of many requests are packed back to back (query_start_loc). Program
(KV head, query tile, request) takes a tile of one request's new tokens, with all the
query heads that share the KV head as rows of the same tile (GQA packing: a K/V tile is
loaded once for the group, and the causal band is BLOCK_M / group tokens wide), and
attends them to the request's context through its block table: every cached prefix
position and its own new tokens up to the diagonal. The K/V of the new tokens are read from the cache,
so write_kv runs first, as in the reference.

The context splits in two loops: positions every row of the tile may see (no mask, the
bulk of a long prefix) and the diagonal band, masked causally. Tiles are issued longest
first, so the programs that finish last are the short ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from common.attention.metadata import AttentionMetadata
from common.attention.triton_paged_tiles import (
    LOG2E,
    check_cache_layout,
    load_kv_tile,
    next_power_of_2,
    num_sms,
    softmax_step,
)


@dataclass(frozen=True)
class PrefillConfig:
    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 3


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    out_ptr,
    qk_scale,
    v_scale,
    num_m_tiles,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_bt,
    stride_block,
    stride_head,
    stride_token,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,  # tile rows: TOKENS new tokens x GROUP query heads
    TOKENS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    kv_head = tl.program_id(0)
    m_tile = num_m_tiles - 1 - tl.program_id(1)
    req = tl.program_id(2)

    q_start = tl.load(query_start_loc_ptr + req)
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    if m_tile * TOKENS >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + req)
    prefix_len = seq_len - q_len

    # row r of the tile is new token m_tile * TOKENS + r // GROUP, query head r % GROUP of
    # this KV head: the heads sharing K/V attend in one tile, so each K/V tile is loaded
    # (and, for fp8, widened) once for all of them
    rows = tl.arange(0, BLOCK_M)
    token_in_req = m_tile * TOKENS + rows // GROUP
    row_mask = (rows < TOKENS * GROUP) & (token_in_req < q_len)
    positions = prefix_len + token_in_req
    heads = kv_head * GROUP + rows % GROUP
    dims = tl.arange(0, D_PAD)
    dim_mask = dims < HEAD_DIM
    tokens = (q_start + token_in_req).to(tl.int64)
    q = tl.load(
        q_ptr + tokens[:, None] * stride_qt + heads[:, None] * stride_qh + dims[None, :],
        mask=row_mask[:, None] & dim_mask[None, :],
        other=0.0,
    )

    k_base = k_cache_ptr + kv_head * stride_head
    v_base = v_cache_ptr + kv_head * stride_head
    table = block_tables_ptr + req.to(tl.int64) * stride_bt
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)

    # positions 0 .. the tile's first token's position are visible to every row
    first_pos = prefix_len + m_tile * TOKENS
    full_end = (first_pos + 1) // BLOCK_N * BLOCK_N
    for n in range(0, full_end, BLOCK_N):
        offs = n + tl.arange(0, BLOCK_N)
        k = load_kv_tile(
            k_base,
            table,
            offs,
            dims,
            offs,
            stride_block,
            stride_token,
            BLOCK_SIZE,
            HEAD_DIM,
            HEAD_DIM == D_PAD,
            False,
        )
        v = load_kv_tile(
            v_base,
            table,
            offs,
            dims,
            offs,
            stride_block,
            stride_token,
            BLOCK_SIZE,
            HEAD_DIM,
            HEAD_DIM == D_PAD,
            False,
        )
        acc, m_i, l_i = softmax_step(q, k, v, acc, m_i, l_i, qk_scale, offs, False)

    # the diagonal band: up to the tile's last token's position, causally masked
    band_end = tl.minimum(prefix_len + (m_tile + 1) * TOKENS, seq_len)
    for n in range(full_end, band_end, BLOCK_N):
        offs = n + tl.arange(0, BLOCK_N)
        in_seq = offs < seq_len
        k = load_kv_tile(
            k_base,
            table,
            offs,
            dims,
            in_seq,
            stride_block,
            stride_token,
            BLOCK_SIZE,
            HEAD_DIM,
            HEAD_DIM == D_PAD,
            True,
        )
        v = load_kv_tile(
            v_base,
            table,
            offs,
            dims,
            in_seq,
            stride_block,
            stride_token,
            BLOCK_SIZE,
            HEAD_DIM,
            HEAD_DIM == D_PAD,
            True,
        )
        visible = (offs[None, :] <= positions[:, None]) & in_seq[None, :]
        acc, m_i, l_i = softmax_step(q, k, v, acc, m_i, l_i, qk_scale, visible, True)

    # padding rows past the tile (rows >= TOKENS * GROUP) may have seen nothing: l_i = 0
    o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None] * v_scale
    out_ptrs = out_ptr + tokens[:, None] * stride_ot + heads[:, None] * stride_oh + dims[None, :]
    tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & dim_mask[None, :])


def default_prefill_config(
    head_dim: int, group: int, num_kv_heads: int, num_tokens: int, device: torch.device
) -> PrefillConfig:
    """Largest tile that still gives every SM work (H100 sweeps, docs/benchmarks.md "Kernels").

    256-row tiles ran fastest on long chunks (358 TFLOP/s on 8x2048 against 303-353 for
    the others) but leave SMs idle on short ones (180 on one 512-token chunk, where
    128x128 tiles gave 304). Work is estimated from the packed token count, so choosing
    costs no host loop over requests.
    """
    if device.type != "cuda":
        return PrefillConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)
    if head_dim > 128:
        return PrefillConfig(block_m=64, block_n=64, num_warps=4, num_stages=2)
    sms = num_sms(device)
    if num_kv_heads * triton.cdiv(num_tokens, max(1, 256 // group)) >= 1.5 * sms:
        return PrefillConfig(block_m=256, block_n=64, num_warps=8, num_stages=3)
    if num_kv_heads * triton.cdiv(num_tokens, max(1, 128 // group)) >= 0.75 * sms:
        return PrefillConfig(block_m=128, block_n=128, num_warps=8, num_stages=3)
    return PrefillConfig(block_m=64, block_n=64, num_warps=4, num_stages=3)


def prefill_attention(
    query: torch.Tensor,  # [T, Hq, D]: new tokens of all requests, packed
    kv_cache: torch.Tensor,  # [N, L, 2, Hkv, BS, D]
    layer: int,
    metadata: AttentionMetadata,
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    *,
    out: torch.Tensor | None = None,
    config: PrefillConfig | None = None,
) -> torch.Tensor:
    """Causal attention of every packed new token to its request's cached context."""
    check_cache_layout(query, kv_cache, layer)
    num_q_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads, block_size = kv_cache.shape[3], kv_cache.shape[4]
    num_reqs = metadata.seq_lens.shape[0]
    group = num_q_heads // num_kv_heads
    config = config or default_prefill_config(head_dim, group, num_kv_heads, query.shape[0], query.device)
    if out is None:
        out = torch.empty_like(query)
    if num_reqs == 0 or metadata.max_query_len == 0:
        return out
    block_m = max(config.block_m, next_power_of_2(group))
    tokens_per_tile = block_m // group
    num_m_tiles = triton.cdiv(metadata.max_query_len, tokens_per_tile)
    _prefill_kernel[(num_kv_heads, num_m_tiles, num_reqs)](
        query,
        kv_cache[:, layer, 0],
        kv_cache[:, layer, 1],
        metadata.block_tables,
        metadata.query_start_loc,
        metadata.seq_lens,
        out,
        float(scale * k_scale * LOG2E),
        float(v_scale),
        num_m_tiles,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        metadata.block_tables.stride(0),
        kv_cache.stride(0),
        kv_cache.stride(3),
        kv_cache.stride(4),
        GROUP=group,
        HEAD_DIM=head_dim,
        D_PAD=next_power_of_2(head_dim),
        BLOCK_SIZE=block_size,
        BLOCK_M=block_m,
        TOKENS=tokens_per_tile,
        BLOCK_N=config.block_n,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out
