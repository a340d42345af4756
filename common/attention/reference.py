"""Plain-torch paged attention: the CPU path, and the reference every kernel is tested against.

Signatures match the Triton kernels (common/attention/triton_*.py) so a backend can
swap one for the other. fp8 caches hold K/V divided by their per-layer scale, saturated
to the e4m3 range (±448) rather than turned into NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from common.attention.metadata import AttentionMetadata

FP8_DTYPES = (torch.float8_e4m3fn,)
FP8_E4M3_MAX = 448.0


def write_kv(
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, D]
    kv_cache: torch.Tensor,  # [N, L, 2, Hkv, BS, D]
    layer: int,
    slot_mapping: torch.Tensor,  # [T] int64, -1 = skip
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    block_size = kv_cache.shape[4]
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    blocks = slot_mapping // block_size
    offsets = slot_mapping % block_size
    # K and V in one scatter: [T, 2, Hkv, D] into the layer's [N, 2, Hkv, BS, D]
    both = torch.stack(
        (_to_cache(key, k_scale, kv_cache.dtype), _to_cache(value, v_scale, kv_cache.dtype)), dim=1
    )
    kv_cache.select(1, layer)[blocks, :, :, offsets] = both


def _to_cache(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    if dtype in FP8_DTYPES:
        return (x.float() / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(dtype)
    return x.to(dtype)


def _from_cache(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    if x.dtype in FP8_DTYPES:
        return (x.float() * scale).to(dtype)
    return x.to(dtype)


def gather_context(
    kv_cache: torch.Tensor, layer: int, block_table: torch.Tensor, seq_len: int, kv: int
) -> torch.Tensor:
    """One request's K (kv=0) or V (kv=1) of one layer as [Hkv, seq_len, D]."""
    num_blocks = -(-seq_len // kv_cache.shape[4])
    tiles = kv_cache[block_table[:num_blocks].long(), layer, kv]  # [nb, Hkv, BS, D]
    hkv, d = tiles.shape[1], tiles.shape[3]
    return tiles.permute(1, 0, 2, 3).reshape(hkv, -1, d)[:, :seq_len]


def paged_attention(
    query: torch.Tensor,  # [T, Hq, D]
    kv_cache: torch.Tensor,
    layer: int,
    metadata: AttentionMetadata,
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Causal attention of every packed query token to its request's cached context."""
    if metadata.is_pure_decode:
        return _decode_attention(query, kv_cache, layer, metadata, scale, k_scale, v_scale)
    out = torch.empty_like(query)
    start = 0
    for i, (q_len, seq_len) in enumerate(zip(metadata.query_lens_cpu, metadata.seq_lens_cpu, strict=True)):
        table = metadata.block_tables[i]
        k = _from_cache(gather_context(kv_cache, layer, table, seq_len, 0), k_scale, query.dtype)
        v = _from_cache(gather_context(kv_cache, layer, table, seq_len, 1), v_scale, query.dtype)
        q = query[start : start + q_len].transpose(0, 1)  # [Hq, q_len, D]
        first_pos = seq_len - q_len
        positions = torch.arange(seq_len, device=query.device)
        mask = positions[None, :] <= (first_pos + positions[:q_len])[:, None]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        out[start : start + q_len] = o.transpose(0, 1)
        start += q_len
    return out


def _decode_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    layer: int,
    metadata: AttentionMetadata,
    scale: float,
    k_scale: float,
    v_scale: float,
) -> torch.Tensor:
    """One query token per request: all requests in one padded SDPA call (one request:
    its context exactly, with no mask)."""
    if metadata.num_reqs == 1:
        return _one_decode(query, kv_cache, layer, metadata, scale, k_scale, v_scale)
    max_len = metadata.max_seq_len
    nb = -(-max_len // kv_cache.shape[4])
    tables = metadata.block_tables[:, :nb]  # [B, nb]
    b = tables.shape[0]
    tiles = _blocks_of_layer(kv_cache, layer, tables.reshape(-1))
    _, _, hkv, bs, d = tiles.shape
    tiles = tiles.view(b, nb, 2, hkv, bs, d)
    kv = tiles.permute(2, 0, 3, 1, 4, 5).reshape(2, b, hkv, nb * bs, d)[:, :, :, :max_len]
    seq_lens = metadata.seq_lens.to(torch.long).cpu() if metadata.seq_lens.is_cuda else metadata.seq_lens
    mask = torch.arange(max_len, device=query.device)[None, :] < seq_lens.to(query.device)[:, None]
    # positions past a sequence's end hold whatever the cache had (even NaN bit patterns);
    # zero them, since a masked score still multiplies its V row by 0.
    keep = mask[:, None, :, None]
    k = _from_cache(kv[0], k_scale, query.dtype).masked_fill(~keep, 0.0)
    v = _from_cache(kv[1], v_scale, query.dtype).masked_fill(~keep, 0.0)
    q = query.unsqueeze(2)  # [B, Hq, 1, D]
    o = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=True
    )
    return o.squeeze(2)


def _blocks_of_layer(kv_cache: torch.Tensor, layer: int, block_ids: torch.Tensor) -> torch.Tensor:
    """[n, 2, Hkv, BS, D]: layer `layer` of the given blocks, gathered (index_select costs a
    third of advanced indexing's time at decode sizes on the CPU)."""
    return kv_cache.select(1, layer).index_select(0, block_ids.long())


def _one_decode(
    query: torch.Tensor,  # [1, Hq, D]
    kv_cache: torch.Tensor,
    layer: int,
    metadata: AttentionMetadata,
    scale: float,
    k_scale: float,
    v_scale: float,
) -> torch.Tensor:
    """One request's one new token against its whole context, no padding and no mask, in two
    batched matmuls grouped by KV head: SDPA's fixed cost on the CPU is several times these
    products' at decode sizes."""
    seq_len = metadata.seq_lens_cpu[0]
    block_size = kv_cache.shape[4]
    tiles = _blocks_of_layer(kv_cache, layer, metadata.block_tables[0, : -(-seq_len // block_size)])
    nb, _, hkv, bs, d = tiles.shape
    kv = tiles.permute(1, 2, 0, 3, 4).reshape(2, hkv, nb * bs, d)[:, :, :seq_len]
    k, v = _from_cache(kv[0], k_scale, query.dtype), _from_cache(kv[1], v_scale, query.dtype)
    hq = query.shape[1]
    q = query.view(hkv, hq // hkv, d)  # the query heads of one KV head are adjacent
    probs = torch.softmax(torch.bmm(q, k.transpose(1, 2)).mul_(scale), dim=-1)
    return torch.bmm(probs, v).view(1, hq, d)


class TorchAttentionBackend:
    """The attention backend of the CPU path (and any device without the Triton kernels)."""

    name = "torch"

    def write_kv(self, key, value, kv_cache, layer, slot_mapping, k_scale=1.0, v_scale=1.0) -> None:
        write_kv(key, value, kv_cache, layer, slot_mapping, k_scale, v_scale)

    def attention(self, query, kv_cache, layer, metadata, scale, k_scale=1.0, v_scale=1.0) -> torch.Tensor:
        return paged_attention(query, kv_cache, layer, metadata, scale, k_scale, v_scale)
