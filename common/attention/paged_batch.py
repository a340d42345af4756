"""Random paged-attention batches, a test fixture: what the kernel tests and the kernel
benchmark run on, each kernel checked against its torch reference.

A batch is a list of requests, each with some new tokens (query_len) at the end of its
context (seq_len). Blocks are handed out in a shuffled order, so block tables are not
monotonic; the cache is filled with random K/V everywhere a request's context lives and
with NaN in the unused tail of each request's last block, so a kernel that reads past
seq_len shows up as NaN instead of passing quietly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.attention import reference
from common.attention.metadata import AttentionMetadata
from common.attention.reference import FP8_DTYPES, FP8_E4M3_MAX


@dataclass
class PagedBatch:
    query: torch.Tensor  # [T, Hq, D]
    key: torch.Tensor  # [T, Hkv, D]: the new tokens' K, as write_kv takes it
    value: torch.Tensor  # [T, Hkv, D]
    kv_cache: torch.Tensor  # [N, L, 2, Hkv, BS, D]
    layer: int
    metadata: AttentionMetadata
    scale: float
    k_scale: float
    v_scale: float

    @property
    def num_tokens(self) -> int:
        return self.query.shape[0]


def make_paged_batch(
    query_lens: list[int],
    seq_lens: list[int],
    *,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    cache_dtype: torch.dtype | None = None,
    num_layers: int = 2,
    layer: int = 1,
    device: torch.device | str = "cpu",
    seed: int = 0,
    spare_blocks: int = 3,
    skip_slots: int = 0,
) -> PagedBatch:
    """A batch whose cache already holds every context position, new tokens included.

    skip_slots marks that many new tokens (the first ones) with slot -1.
    """
    if len(query_lens) != len(seq_lens) or any(q > s for q, s in zip(query_lens, seq_lens, strict=True)):
        raise ValueError(f"each query_len must be <= its seq_len: {query_lens} vs {seq_lens}")
    device = torch.device(device)
    cache_dtype = cache_dtype or dtype
    gen = torch.Generator(device="cpu").manual_seed(seed)
    blocks_per_req = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_req) + spare_blocks
    order = torch.randperm(num_blocks, generator=gen)
    max_blocks = max(blocks_per_req, default=1) or 1
    tables = torch.zeros((len(seq_lens), max_blocks), dtype=torch.int32)
    used = 0
    for i, n in enumerate(blocks_per_req):
        tables[i, :n] = order[used : used + n]
        used += n

    fp8 = cache_dtype in FP8_DTYPES
    k_scale, v_scale = (0.05, 0.04) if fp8 else (1.0, 1.0)
    shape = (num_blocks, num_layers, 2, num_kv_heads, block_size, head_dim)
    if device.type == "cpu":
        values = torch.randn(shape, generator=gen)
    else:  # large caches: draw on the device, in a 2-byte type unless the cache is fp32
        draw_dtype = torch.bfloat16 if fp8 else cache_dtype
        dev_gen = torch.Generator(device=device).manual_seed(seed)
        values = torch.randn(shape, generator=dev_gen, device=device, dtype=draw_dtype)
    if fp8:
        values[:, :, 0] /= k_scale
        values[:, :, 1] /= v_scale
        kv_cache = values.clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(device=device, dtype=cache_dtype)
    else:
        kv_cache = values.to(device=device, dtype=cache_dtype)
    del values
    for i, s in enumerate(seq_lens):  # poison the tail of each last block
        tail = blocks_per_req[i] * block_size - s
        if tail:
            last = int(tables[i, blocks_per_req[i] - 1])
            kv_cache[last, :, :, :, block_size - tail :] = float("nan")

    total = sum(query_lens)
    query = torch.randn((total, num_q_heads, head_dim), generator=gen).to(device=device, dtype=dtype)
    key = torch.randn((total, num_kv_heads, head_dim), generator=gen).to(device=device, dtype=dtype)
    value = torch.randn((total, num_kv_heads, head_dim), generator=gen).to(device=device, dtype=dtype)

    slots = []
    for i, (q, s) in enumerate(zip(query_lens, seq_lens, strict=True)):
        for pos in range(s - q, s):
            slots.append(int(tables[i, pos // block_size]) * block_size + pos % block_size)
    slot_mapping = torch.tensor(slots, dtype=torch.int64)
    slot_mapping[:skip_slots] = -1
    starts = [0]
    for q in query_lens:
        starts.append(starts[-1] + q)
    metadata = AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=tables.to(device),
        slot_mapping=slot_mapping.to(device),
        max_query_len=max(query_lens, default=0),
        max_seq_len=max(seq_lens, default=0),
        query_lens_cpu=list(query_lens),
        seq_lens_cpu=list(seq_lens),
    )
    return PagedBatch(query, key, value, kv_cache, layer, metadata, head_dim**-0.5, k_scale, v_scale)


def first_requests(metadata: AttentionMetadata, n: int) -> AttentionMetadata:
    """The metadata of the batch's first n requests (their tokens come first in the packing)."""
    if n >= len(metadata.seq_lens_cpu):
        return metadata
    rows = sum(metadata.query_lens_cpu[:n])
    return AttentionMetadata(
        query_start_loc=metadata.query_start_loc[: n + 1],
        seq_lens=metadata.seq_lens[:n],
        block_tables=metadata.block_tables[:n],
        slot_mapping=metadata.slot_mapping[:rows],
        max_query_len=max(metadata.query_lens_cpu[:n]),
        max_seq_len=max(metadata.seq_lens_cpu[:n]),
        query_lens_cpu=metadata.query_lens_cpu[:n],
        seq_lens_cpu=metadata.seq_lens_cpu[:n],
    )


def reference_error(batch: PagedBatch, out: torch.Tensor, max_requests: int | None = None) -> float:
    """Relative error of a kernel's attention output against the fp32 reference.

    Requests are independent, so a large batch is checked on its first max_requests
    (the reference materializes each request's whole context).
    """
    metadata = batch.metadata if max_requests is None else first_requests(batch.metadata, max_requests)
    rows = sum(metadata.query_lens_cpu)
    ref = reference.paged_attention(
        batch.query[:rows].float(),
        batch.kv_cache,
        batch.layer,
        metadata,
        batch.scale,
        batch.k_scale,
        batch.v_scale,
    )
    return relative_error(out[:rows], ref)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN anywhere gives inf."""
    out64, ref64 = out.double(), ref.double()
    if not torch.isfinite(out64).all():
        return float("inf")
    return float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30))
