"""Triton paged decode attention: one query token per sequence, split over the context.

Flash-decoding: program (seq, kv_head, split) attends the query heads that share one KV
head (packed as the rows of one tile, padded to 16 so tl.dot gets M >= 16) to its share
of the sequence's context; the splits are merged by their log-sum-exp, by the last split of
each (sequence, KV head) to finish (an atomic count per group) or by a second kernel. With
one split the first kernel writes the output itself.

Given the step's new K/V (NewTokenKV), the kernel also does what rotary_write_kv would do
in a launch of its own: RoPE on the query in registers, and, in the split whose range holds
the new token, RoPE on its K and the write of K and V into the cache before that split reads
its tiles. A decode step then launches one kernel fewer per layer.

The grid is (batch, kv_heads, num_splits) and each program finds its token range from the
sequence length on the device, so nothing in a launch depends on context lengths read on
the host: a step can be captured in a CUDA graph once per batch size and split count and
replayed at any context length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from common.attention.metadata import AttentionMetadata
from common.attention.reference import FP8_DTYPES, FP8_E4M3_MAX
from common.attention.triton_paged_tiles import (
    LOG2E,
    check_cache_layout,
    load_kv_tile,
    next_power_of_2,
    num_sms,
    pdl_enabled,
    pdl_wait,
    rope_rows,
    softmax_step,
)
from common.attention.triton_write_kv import fp8_scaled

# A split shorter than this spends more on its merge than it saves (H100: at batch 1,
# 512 tokens ran 19.9 µs in 1 split, 12.3 in 4, 10.8 in 8; docs/benchmarks.md "Kernels").
MIN_TOKENS_PER_SPLIT = 64
MAX_SPLITS = 32
# Context tokens a split takes at least, applied on the device to the actual context: with
# the split count captured for the longest context, a short one then runs fewer, longer
# splits (the rest find nothing to do). 0: the context is spread over every split.
MIN_SPLIT_TOKENS = 0


@dataclass(frozen=True)
class NewTokenKV:
    """This step's K/V of each sequence's new token, for decode_attention to apply RoPE (to q as
    well) and write into the cache itself: what rotary_write_kv would do in a launch of its own."""

    key: torch.Tensor  # [B, Hkv, D], before RoPE
    value: torch.Tensor  # [B, Hkv, D]
    positions: torch.Tensor  # [B] int64
    cos: torch.Tensor  # [P, D/2] fp32
    sin: torch.Tensor
    slot_mapping: torch.Tensor  # [B] int64, -1: keep nothing
    k_scale: float = 1.0  # the fp8 cache's scales (ignored for a 16-bit cache)
    v_scale: float = 1.0


@dataclass(frozen=True)
class DecodeConfig:
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3


def default_decode_config(kv_cache_dtype: torch.dtype) -> DecodeConfig:
    # H100 sweeps: bf16 ran within 2% across tile shapes; fp8 ran 15% faster with
    # 128-token tiles (batch 256, context 8192: 1930 µs against 2274 with 64)
    if kv_cache_dtype in FP8_DTYPES:
        return DecodeConfig(block_n=128, num_warps=4, num_stages=3)
    return DecodeConfig()


@triton.jit
def _decode_split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    out_ptr,
    part_out_ptr,  # [B, Hq, num_splits, D_PAD] fp32, normalized per split
    part_lse_ptr,  # [B, Hq, num_splits] fp32, base-2 log-sum-exp per split
    counters_ptr,  # [>= B * Hkv] int32, zero between launches: splits done per (seq, KV head)
    k_new_ptr,  # NEW_TOKEN: this step's k [B, Hkv, D], before RoPE
    v_new_ptr,  # NEW_TOKEN: this step's v [B, Hkv, D]
    positions_ptr,  # NEW_TOKEN: [B] int64, the token's RoPE position
    cos_ptr,  # NEW_TOKEN: [P, D/2] fp32
    sin_ptr,
    slot_mapping_ptr,  # NEW_TOKEN: [B] int64 cache slot of the new token, -1: keep nothing
    qk_scale,
    v_scale,
    k_write_scale,  # NEW_TOKEN into an fp8 cache: the stored value is x / scale
    v_write_scale,
    num_splits,
    stride_qb,
    stride_qh,
    stride_ob,
    stride_oh,
    stride_bt,
    stride_block,
    stride_head,
    stride_token,
    stride_knb,
    stride_knh,
    stride_vnb,
    stride_vnh,
    stride_cos,
    NUM_Q_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr,
    FUSED_MERGE: tl.constexpr,  # the last split of each (seq, KV head) to finish merges them
    SPLITS_PAD: tl.constexpr,
    MIN_SPLIT_TOKENS: tl.constexpr,
    NEW_TOKEN: tl.constexpr,  # q arrives before RoPE; the new token's K/V is written here
    FP8: tl.constexpr,
    FP8_MAX: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_wait(PDL)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + seq)
    split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    if MIN_SPLIT_TOKENS > 0:
        split_len = tl.maximum(split_len, MIN_SPLIT_TOKENS)
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    rows = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + rows
    row_mask = rows < GROUP
    dims = tl.arange(0, D_PAD)
    dim_mask = dims < HEAD_DIM
    q_ptrs = q_ptr + seq.to(tl.int64) * stride_qb + heads[:, None] * stride_qh
    q_mask = row_mask[:, None] & dim_mask[None, :]
    q = tl.load(q_ptrs + dims[None, :], mask=q_mask, other=0.0)
    if NEW_TOKEN:
        # RoPE on q here (no kernel of its own), as rotary_write_kv rounds it
        half: tl.constexpr = HEAD_DIM // 2
        position = tl.load(positions_ptr + seq)
        partner = tl.where(dims < half, dims + half, dims - half)
        sign = tl.where(dims < half, -1.0, 1.0)
        pair = dims % half
        cos = tl.load(cos_ptr + position * stride_cos + pair, mask=dim_mask, other=0.0).to(q.dtype)
        sin = tl.load(sin_ptr + position * stride_cos + pair, mask=dim_mask, other=0.0).to(q.dtype)
        cos = cos.to(tl.float32)
        sin = sin.to(tl.float32)
        q_partner = tl.load(q_ptrs + partner[None, :], mask=q_mask, other=0.0)
        q = rope_rows(q, q_partner, cos[None, :], sin[None, :], sign[None, :])
        # the split that holds the new token's position writes its K/V first, then reads
        # them back with the rest of its tiles (visible to the whole program after the barrier)
        new_pos = seq_len - 1
        if (new_pos >= start) & (new_pos < end):
            slot = tl.load(slot_mapping_ptr + seq)
            if slot >= 0:
                k_row = k_new_ptr + seq.to(tl.int64) * stride_knb + kv_head * stride_knh
                v_row = v_new_ptr + seq.to(tl.int64) * stride_vnb + kv_head * stride_vnh
                k1 = tl.load(k_row + dims, mask=dim_mask, other=0.0)
                k2 = tl.load(k_row + partner, mask=dim_mask, other=0.0)
                k = rope_rows(k1, k2, cos, sin, sign)
                v = tl.load(v_row + dims, mask=dim_mask, other=0.0)
                if FP8:
                    k = fp8_scaled(k, k_write_scale, FP8_MAX)
                    v = fp8_scaled(v, v_write_scale, FP8_MAX)
                dest = (slot // BLOCK_SIZE).to(tl.int64) * stride_block + (slot % BLOCK_SIZE) * stride_token
                dest += kv_head * stride_head + dims
                tl.store(k_cache_ptr + dest, k.to(k_cache_ptr.dtype.element_ty), mask=dim_mask)
                tl.store(v_cache_ptr + dest, v.to(v_cache_ptr.dtype.element_ty), mask=dim_mask)
            tl.debug_barrier()

    k_base = k_cache_ptr + kv_head * stride_head
    v_base = v_cache_ptr + kv_head * stride_head
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
    for n in range(start, end, BLOCK_N):
        offs = n + tl.arange(0, BLOCK_N)
        valid = offs < end
        k = load_kv_tile(
            k_base,
            table,
            offs,
            dims,
            valid,
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
            valid,
            stride_block,
            stride_token,
            BLOCK_SIZE,
            HEAD_DIM,
            HEAD_DIM == D_PAD,
            True,
        )
        acc, m_i, l_i = softmax_step(q, k, v, acc, m_i, l_i, qk_scale, valid[None, :], True)

    # an empty split (context shorter than split * split_len) leaves l_i = 0: output 0, lse -inf
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_safe[:, None] * v_scale
    if SINGLE_SPLIT:
        out_ptrs = out_ptr + seq.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + dims[None, :]
        tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & dim_mask[None, :])
    else:
        part = (seq.to(tl.int64) * NUM_Q_HEADS + heads) * num_splits + split
        tl.store(part_out_ptr + part[:, None] * D_PAD + dims[None, :], o, mask=row_mask[:, None])
        lse = tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(part_lse_ptr + part, lse, mask=row_mask)
        if FUSED_MERGE:
            # every thread's partial stored before the count goes up (release); the program
            # that counts last reads them all (acquire) and resets the count for the next launch
            tl.debug_barrier()
            counter = counters_ptr + seq * tl.num_programs(1) + kv_head
            done = tl.atomic_add(counter, 1, sem="acq_rel")
            if done == num_splits - 1:
                _merge_group(
                    part_out_ptr, part_lse_ptr, out_ptr, seq, heads, row_mask, dims, dim_mask,
                    num_splits, stride_ob, stride_oh, NUM_Q_HEADS, GROUP_PAD, D_PAD, SPLITS_PAD,
                )  # fmt: skip
                tl.atomic_xchg(counter, 0)


@triton.jit
def _merge_group(
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    seq,
    heads,
    row_mask,
    dims,
    dim_mask,
    num_splits,
    stride_ob,
    stride_oh,
    NUM_Q_HEADS: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    D_PAD: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    """Merge the splits of a group of query heads by their log-sum-exp (what
    _decode_merge_kernel does for one head), reading the partials from L2."""
    splits = tl.arange(0, SPLITS_PAD)
    first = (seq.to(tl.int64) * NUM_Q_HEADS + heads) * num_splits  # [GROUP_PAD]
    lse = tl.load(
        part_lse_ptr + first[:, None] + splits[None, :],
        mask=row_mask[:, None] & (splits < num_splits)[None, :],
        other=float("-inf"),
        cache_modifier=".cg",
    )
    top = tl.max(lse, 1)
    top = tl.where(top == float("-inf"), 0.0, top)  # a zero-length sequence: all weights 0
    weights = tl.exp2(lse - top[:, None])
    total = tl.sum(weights, 1)
    acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
    for s in range(0, num_splits):
        part = tl.load(
            part_out_ptr + (first + s)[:, None] * D_PAD + dims[None, :],
            mask=row_mask[:, None],
            other=0.0,
            cache_modifier=".cg",
        )
        weight = tl.sum(tl.where(splits[None, :] == s, weights, 0.0), 1)
        acc += part * weight[:, None]
    o = acc / tl.where(total > 0.0, total, 1.0)[:, None]
    out_ptrs = out_ptr + seq.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + dims[None, :]
    tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & dim_mask[None, :])


@triton.jit
def _decode_merge_kernel(
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    num_splits,
    stride_ob,
    stride_oh,
    NUM_Q_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_wait(PDL)
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    split_mask = splits < num_splits
    dims = tl.arange(0, D_PAD)
    part = (seq.to(tl.int64) * NUM_Q_HEADS + head) * num_splits + splits
    lse = tl.load(part_lse_ptr + part, mask=split_mask, other=float("-inf"))
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)  # a zero-length sequence: all weights 0
    weights = tl.exp2(lse - top)
    total = tl.sum(weights, 0)
    parts = tl.load(part_out_ptr + part[:, None] * D_PAD + dims[None, :], mask=split_mask[:, None], other=0.0)
    o = tl.sum(parts * weights[:, None], 0) / tl.where(total > 0.0, total, 1.0)
    out_ptrs = out_ptr + seq.to(tl.int64) * stride_ob + head * stride_oh + dims
    tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


# zeroed once per device; each fused-merge launch leaves its counts at 0 again. A split count
# above 1 is only chosen while (sequences x KV heads) programs leave SMs idle, far below this.
_COUNTERS_SIZE = 4096
_counters: dict[torch.device, torch.Tensor] = {}


def _merge_counters(device: torch.device) -> torch.Tensor:
    if device not in _counters:
        _counters[device] = torch.zeros(_COUNTERS_SIZE, dtype=torch.int32, device=device)
    return _counters[device]


def choose_num_splits(batch_size: int, max_seq_len: int, num_kv_heads: int, sm_count: int) -> int:
    """Split the context until (sequence, KV head, split) programs fill the GPU about twice.

    A CUDA-graph runner passes the longest context it will replay (max_model_len) as
    max_seq_len, so the captured split count serves every shorter context too.
    """
    programs = batch_size * num_kv_heads
    wanted = triton.cdiv(2 * sm_count, programs)
    worth_it = triton.cdiv(max(max_seq_len, 1), MIN_TOKENS_PER_SPLIT)
    return max(1, min(wanted, worth_it, MAX_SPLITS))


def decode_attention(
    query: torch.Tensor,  # [B, Hq, D]: one token per sequence
    kv_cache: torch.Tensor,  # [N, L, 2, Hkv, BS, D]
    layer: int,
    metadata: AttentionMetadata,
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    *,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    config: DecodeConfig | None = None,
    fused_merge: bool = False,
    new_kv: NewTokenKV | None = None,
) -> torch.Tensor:
    """Attention of each sequence's single new token to its whole cached context.

    With several splits, `fused_merge` has the last split of each (sequence, KV head) merge
    them inside the same launch, instead of a second kernel. With `new_kv`, the query is
    taken before RoPE, and the new token's K/V (the last of each sequence's context) is
    rotated and written into the cache by the split that attends to it: the same bits as
    rotary_write_kv and then this attention, one launch fewer."""
    check_cache_layout(query, kv_cache, layer)
    batch, num_q_heads, head_dim = query.shape
    num_kv_heads, block_size = kv_cache.shape[3], kv_cache.shape[4]
    if metadata.seq_lens.shape[0] != batch:
        raise ValueError(
            f"decode attention takes one query token per sequence: {batch} tokens "
            f"for {metadata.seq_lens.shape[0]} sequences"
        )
    if new_kv is not None:
        _check_new_kv(new_kv, batch, num_kv_heads, head_dim)
    if num_splits is None:
        num_splits = choose_num_splits(batch, metadata.max_seq_len, num_kv_heads, num_sms(query.device))
    config = config or default_decode_config(kv_cache.dtype)
    if out is None:
        out = torch.empty_like(query)
    if batch == 0:
        return out
    group = num_q_heads // num_kv_heads
    d_pad = next_power_of_2(head_dim)
    pdl = pdl_enabled(query.device)
    single = num_splits == 1
    fused_merge = fused_merge and not single and batch * num_kv_heads <= _COUNTERS_SIZE
    counters = _merge_counters(query.device) if fused_merge else metadata.seq_lens  # unused unless fused
    if single:
        part_out = part_lse = out  # unused by the kernel
    else:
        part_out = torch.empty(
            (batch, num_q_heads, num_splits, d_pad), dtype=torch.float32, device=query.device
        )
        part_lse = torch.empty((batch, num_q_heads, num_splits), dtype=torch.float32, device=query.device)
    if new_kv is None:
        new_tensors, new_strides, write_scales = (query,) * 6, (0,) * 5, (1.0, 1.0)  # unused
    else:
        k, v, cos = new_kv.key, new_kv.value, new_kv.cos
        new_tensors = (k, v, new_kv.positions, cos, new_kv.sin, new_kv.slot_mapping)
        new_strides = (k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0))
        write_scales = (float(new_kv.k_scale), float(new_kv.v_scale))
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        query,
        kv_cache[:, layer, 0],
        kv_cache[:, layer, 1],
        metadata.block_tables,
        metadata.seq_lens,
        out,
        part_out,
        part_lse,
        counters,
        *new_tensors,
        float(scale * k_scale * LOG2E),
        float(v_scale),
        *write_scales,
        num_splits,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        metadata.block_tables.stride(0),
        kv_cache.stride(0),
        kv_cache.stride(3),
        kv_cache.stride(4),
        *new_strides,
        NUM_Q_HEADS=num_q_heads,
        GROUP=group,
        GROUP_PAD=max(16, next_power_of_2(group)),
        HEAD_DIM=head_dim,
        D_PAD=d_pad,
        BLOCK_SIZE=block_size,
        BLOCK_N=config.block_n,
        SINGLE_SPLIT=single,
        FUSED_MERGE=fused_merge,
        SPLITS_PAD=max(2, next_power_of_2(num_splits)),
        MIN_SPLIT_TOKENS=MIN_SPLIT_TOKENS,
        NEW_TOKEN=new_kv is not None,
        FP8=kv_cache.dtype in FP8_DTYPES,
        FP8_MAX=FP8_E4M3_MAX,
        PDL=pdl,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **({"launch_pdl": True} if pdl else {}),
    )
    if not single and not fused_merge:
        _decode_merge_kernel[(batch, num_q_heads)](
            part_out,
            part_lse,
            out,
            num_splits,
            out.stride(0),
            out.stride(1),
            NUM_Q_HEADS=num_q_heads,
            HEAD_DIM=head_dim,
            D_PAD=d_pad,
            SPLITS_PAD=max(2, next_power_of_2(num_splits)),
            PDL=pdl,
            num_warps=4,
            **({"launch_pdl": True} if pdl else {}),
        )
    return out


def _check_new_kv(new: NewTokenKV, batch: int, num_kv_heads: int, head_dim: int) -> None:
    """Refuse new-token K/V the kernel would misread."""
    if new.key.shape != (batch, num_kv_heads, head_dim) or new.value.shape != new.key.shape:
        raise ValueError(
            f"new-token key/value must be [{batch}, {num_kv_heads}, {head_dim}]; "
            f"got {tuple(new.key.shape)} and {tuple(new.value.shape)}"
        )
    if new.key.stride(-1) != 1 or new.value.stride(-1) != 1 or new.cos.stride(-1) != 1:
        raise ValueError("new-token key, value and cos must be contiguous in the head dimension")
    if new.sin.stride() != new.cos.stride() or new.cos.shape[-1] * 2 != head_dim or head_dim % 2:
        raise ValueError(
            f"cos/sin must be two [positions, {head_dim // 2}] tables of one layout; "
            f"got {tuple(new.cos.shape)} and {tuple(new.sin.shape)}"
        )
    if new.positions.shape != (batch,) or new.slot_mapping.shape != (batch,):
        raise ValueError(
            f"positions and slot_mapping must hold one entry per sequence ({batch}); "
            f"got {tuple(new.positions.shape)} and {tuple(new.slot_mapping.shape)}"
        )
