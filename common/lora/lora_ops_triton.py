"""The batched LoRA matmuls in Triton (CUDA; Triton's interpreter runs them on CPU in tests).

Same signatures and results as lora_ops.py, the torch reference: lora_shrink gives
x [T, in] @ A[slot of t]^T as [T, n R], lora_expand_add adds scale * shrunk band j @ B band
j^T into y. Each launch serves every adapter of the step, in the spirit of Punica's SGMV and
S-LoRA: the step's tokens, grouped by slot in LoRABatch.sorted_tokens, are cut into tiles of
BLOCK_M tokens of one slot; a program gathers its tile's rows, multiplies them by its slot's
weight tile with tl.dot and writes (or adds) them back at the same rows. A token lies in one
tile, so no two programs write one element and no atomics are needed.

CUDA-graph safe: the grids depend only on T, the slot count S and the weight shapes, never
on how the tokens spread over the slots. Each program finds its tile from slot_starts on the
device (a cumulative sum of the slots' tile counts, S + 1 entries), so the grid has
cdiv(T, BLOCK_M) + S + 1 tiles however the tokens spread: one slot of T tokens, or T slots
of one, each leaves at most S + 1 programs idle, where a grid of cdiv(T, BLOCK_M) tiles per
slot would leave up to S times the useful ones idle.

The shrink reads little weight (n R rows of A per slot) against a long K, so at decode
sizes a handful of tiles would stream all of K alone: it splits K over SPLIT_K programs
that write fp32 partial sums, and a second kernel adds them up in x's dtype (and zeroes the
base-model rows). Without a split, programs of a last segment (the base-model tokens) write
the zeros themselves.

The kernels read no adapter rank: a slot's rows of A past its rank (and so its shrunk
columns past the rank) must be zero, as the slot loader leaves them; the torch reference
slices them off instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from common.attention.triton_paged_tiles import next_power_of_2, num_sms
from common.lora.lora_ops import LoRABatch

MAX_BANDS = 3  # the fused qkv projection's q, k, v


@dataclass(frozen=True)
class ShrinkConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class ExpandConfig:
    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


def shrink_config(num_tokens: int, width: int, k: int, sms: int) -> ShrinkConfig:
    """Tiles for a [num_tokens, k] @ [k, width] shrink on `sms` multiprocessors. K is split
    until about two programs a multiprocessor have work, assuming the tokens spread over
    several slots (each slot's last tile is partly empty). On an H200, 64 decode tokens over 8
    adapters: Llama-3-8B's down shrink takes 11.9 us split 32 ways, 50.8 unsplit
    (docs/benchmarks.md, LoRA kernels)."""
    block_m = 16 if num_tokens <= 128 else 64
    block_n = min(max(16, next_power_of_2(width)), 128)
    block_k = 128 if k >= 1024 else 64
    tiles = triton.cdiv(num_tokens, block_m) * triton.cdiv(width, block_n)
    split = 1
    while split * 2 * tiles <= 2 * sms and split * 2 * block_k * 2 <= k:
        split *= 2
    return ShrinkConfig(block_m, block_n, block_k, split)


def expand_config(num_tokens: int) -> ExpandConfig:
    return ExpandConfig(16, 128) if num_tokens <= 128 else ExpandConfig(64, 128)


@triton.jit
def _slot_tile(
    tile,
    starts_ptr,
    num_slots,
    num_tokens,
    WITH_BASE: tl.constexpr,
    SEGMENTS: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """(slot, first sorted position, end of the slot's run) of the tile-th tile of BLOCK_M
    tokens, counting every slot's tiles in slot order; slot num_slots is the base-model tokens
    (with WITH_BASE). A tile past the last gives a first position >= end."""
    seg = tl.arange(0, SEGMENTS)
    lo = tl.load(starts_ptr + seg, mask=seg <= num_slots, other=0)
    hi = tl.load(starts_ptr + seg + 1, mask=seg < num_slots, other=0)
    if WITH_BASE:
        hi = tl.where(seg == num_slots, num_tokens, hi)
    tiles = (tl.maximum(hi - lo, 0) + BLOCK_M - 1) // BLOCK_M
    ends = tl.cumsum(tiles, 0)
    slot = tl.sum((ends <= tile).to(tl.int32), 0)
    mine = seg == slot
    first_tile = tl.sum(tl.where(mine, ends - tiles, 0), 0)
    start = tl.sum(tl.where(mine, lo, 0), 0) + (tile - first_tile) * BLOCK_M
    end = tl.sum(tl.where(mine, hi, 0), 0)
    return slot, start, end


@triton.jit
def _shrink_kernel(
    x_ptr,
    a_ptr,
    out_ptr,
    sorted_ptr,
    starts_ptr,
    num_tokens,
    num_slots,
    width,
    k,
    x_stride,
    a_stride_slot,
    a_stride_row,
    out_stride_split,
    out_stride_row,
    k_per_split,
    SPLIT_K: tl.constexpr,
    SEGMENTS: tl.constexpr,
    EVEN_K: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(1)
    n_tiles = tl.cdiv(width, BLOCK_N)
    split = pid_n // n_tiles
    pid_n = pid_n % n_tiles
    # without a split, the base-model tokens form a last segment whose programs write zeros
    slot, start, end = _slot_tile(
        tl.program_id(0), starts_ptr, num_slots, num_tokens, SPLIT_K == 1, SEGMENTS, BLOCK_M
    )
    if start >= end:
        return
    offs_m = start + tl.arange(0, BLOCK_M)
    row_mask = offs_m < end
    rows = tl.load(sorted_ptr + offs_m, mask=row_mask, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < width
    out_ptrs = out_ptr + split * out_stride_split + rows[:, None] * out_stride_row + offs_n[None, :]
    out_mask = row_mask[:, None] & n_mask[None, :]
    if slot == num_slots:
        tl.store(out_ptrs, tl.zeros([BLOCK_M, BLOCK_N], dtype=out_ptr.dtype.element_ty), mask=out_mask)
        return
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * x_stride + offs_k[None, :]
    # A's tile read as [BLOCK_K, BLOCK_N]: the dot's right operand, A^T
    a_ptrs = a_ptr + slot.to(tl.int64) * a_stride_slot + offs_n[None, :] * a_stride_row + offs_k[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, k)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if EVEN_K:
            xs = tl.load(x_ptrs + k0, mask=row_mask[:, None], other=0.0)
            ws = tl.load(a_ptrs + k0, mask=n_mask[None, :], other=0.0)
        else:
            k_mask = k0 + offs_k < k_hi
            xs = tl.load(x_ptrs + k0, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            ws = tl.load(a_ptrs + k0, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(xs, ws.to(xs.dtype), acc, input_precision=PRECISION)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _split_k_sum_kernel(
    partial_ptr,
    out_ptr,
    slots_ptr,
    num_tokens,
    width,
    out_stride,
    SPLIT_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """out[t] = sum of the SPLIT_K partials of row t in out's dtype, zero on base-model rows
    (whose partials no program wrote)."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = tl.arange(0, BLOCK_N)
    t_mask = offs_t < num_tokens
    adapter = tl.load(slots_ptr + offs_t, mask=t_mask, other=-1) >= 0
    mask = t_mask[:, None] & (offs_n < width)[None, :]
    ptrs = partial_ptr + offs_t.to(tl.int64)[:, None] * width + offs_n[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    for i in range(SPLIT_K):
        acc += tl.load(ptrs + i * num_tokens * width, mask=mask & adapter[:, None], other=0.0)
    out_ptrs = out_ptr + offs_t.to(tl.int64)[:, None] * out_stride + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _band_dot(
    acc,
    sh_ptrs,
    b_ptrs,
    row_mask,
    r_mask,
    offs_n,
    n_mask,
    band_lo,
    band_hi,
    n_lo,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """acc + shrunk's band columns @ B's band rows^T, for the columns of this tile inside
    [band_lo, band_hi); a tile that misses the band adds nothing."""
    if (n_lo < band_hi) & (n_lo + BLOCK_N > band_lo):
        sh = tl.load(sh_ptrs, mask=row_mask[:, None] & r_mask[None, :], other=0.0)
        in_band = n_mask & (offs_n >= band_lo) & (offs_n < band_hi)
        ws = tl.load(b_ptrs, mask=r_mask[:, None] & in_band[None, :], other=0.0)
        acc = tl.dot(sh, ws.to(sh.dtype), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _expand_kernel(
    y_ptr,
    shrunk_ptr,
    b_ptr,
    scales_ptr,
    sorted_ptr,
    starts_ptr,
    num_tokens,
    num_slots,
    out_width,
    rank,
    band1,
    band2,
    y_stride,
    shrunk_stride,
    b_stride_slot,
    b_stride_row,
    NUM_BANDS: tl.constexpr,
    SEGMENTS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    slot, start, end = _slot_tile(
        tl.program_id(0), starts_ptr, num_slots, num_tokens, False, SEGMENTS, BLOCK_M
    )
    if start >= end:
        return
    offs_m = start + tl.arange(0, BLOCK_M)
    row_mask = offs_m < end
    rows = tl.load(sorted_ptr + offs_m, mask=row_mask, other=0).to(tl.int64)
    n_lo = tl.program_id(1) * BLOCK_N
    offs_n = n_lo + tl.arange(0, BLOCK_N)
    n_mask = offs_n < out_width
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    sh_ptrs = shrunk_ptr + rows[:, None] * shrunk_stride + offs_r[None, :]
    # B's tile read as [BLOCK_R, BLOCK_N]: the dot's right operand, B^T
    b_ptrs = b_ptr + slot.to(tl.int64) * b_stride_slot + offs_n[None, :] * b_stride_row + offs_r[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if NUM_BANDS == 1:
        acc = _band_dot(
            acc, sh_ptrs, b_ptrs, row_mask, r_mask, offs_n, n_mask, 0, out_width, n_lo, BLOCK_N, PRECISION
        )
    else:
        acc = _band_dot(
            acc, sh_ptrs, b_ptrs, row_mask, r_mask, offs_n, n_mask, 0, band1, n_lo, BLOCK_N, PRECISION
        )
        if NUM_BANDS == 2:
            acc = _band_dot(
                acc,
                sh_ptrs + rank,
                b_ptrs,
                row_mask,
                r_mask,
                offs_n,
                n_mask,
                band1,
                out_width,
                n_lo,
                BLOCK_N,
                PRECISION,
            )
        else:
            acc = _band_dot(
                acc,
                sh_ptrs + rank,
                b_ptrs,
                row_mask,
                r_mask,
                offs_n,
                n_mask,
                band1,
                band2,
                n_lo,
                BLOCK_N,
                PRECISION,
            )
            acc = _band_dot(
                acc,
                sh_ptrs + 2 * rank,
                b_ptrs,
                row_mask,
                r_mask,
                offs_n,
                n_mask,
                band2,
                out_width,
                n_lo,
                BLOCK_N,
                PRECISION,
            )
    scale = tl.load(scales_ptr + slot)
    y_ptrs = y_ptr + rows[:, None] * y_stride + offs_n[None, :]
    mask = row_mask[:, None] & n_mask[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + acc * scale).to(y.dtype), mask=mask)


def _precision(dtype: torch.dtype) -> str:
    """fp32 inputs multiply in full fp32 (as the torch path on CUDA does by default), not tf32."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _segments(num_slots: int) -> int:
    return max(2, next_power_of_2(num_slots + 1))


def _check_batch(batch: LoRABatch, num_slots: int, num_tokens: int) -> None:
    if batch.slot_starts.shape[0] != num_slots + 1 or batch.sorted_tokens.shape[0] != num_tokens:
        raise ValueError(
            f"LoRABatch of {batch.sorted_tokens.shape[0]} tokens and {batch.slot_starts.shape[0] - 1} slots "
            f"does not fit {num_tokens} tokens and weights of {num_slots} slots"
        )


def lora_shrink(x: torch.Tensor, a: torch.Tensor, batch: LoRABatch, num_bands: int) -> torch.Tensor:
    """x [T, in] @ each token's slot's A^T: [T, num_bands * R] in x's dtype, zero on the
    rows of base-model tokens."""
    tokens, k = x.shape
    width = a.shape[1]
    return lora_shrink_with(x, a, batch, shrink_config(tokens, width, k, num_sms(x.device)))


def lora_shrink_with(
    x: torch.Tensor, a: torch.Tensor, batch: LoRABatch, config: ShrinkConfig
) -> torch.Tensor:
    """lora_shrink with given tiles (the benchmark's sweep)."""
    tokens, k = x.shape
    num_slots, width = a.shape[0], a.shape[1]
    _check_batch(batch, num_slots, tokens)
    if a.shape[2] != k or x.stride(1) != 1 or a.stride(2) != 1:
        raise ValueError(f"lora_shrink needs x [T, {a.shape[2]}] and A [S, nR, in], each row contiguous")
    out = torch.empty(tokens, width, dtype=x.dtype, device=x.device)
    if tokens == 0:
        return out
    split = config.split_k
    k_per_split = triton.cdiv(triton.cdiv(k, split), config.block_k) * config.block_k
    target = torch.empty(split, tokens, width, dtype=torch.float32, device=x.device) if split > 1 else out
    tiles = triton.cdiv(tokens, config.block_m) + num_slots + 1
    grid = (tiles, triton.cdiv(width, config.block_n) * split)
    _shrink_kernel[grid](
        x,
        a,
        target,
        batch.sorted_tokens,
        batch.slot_starts,
        tokens,
        num_slots,
        width,
        k,
        x.stride(0),
        a.stride(0),
        a.stride(1),
        tokens * width if split > 1 else 0,
        width,
        k_per_split,
        SPLIT_K=split,
        SEGMENTS=_segments(num_slots),
        EVEN_K=k % config.block_k == 0,  # then every split starts and ends on a whole block
        PRECISION=_precision(x.dtype),
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if split > 1:
        block_t = 16
        _split_k_sum_kernel[(triton.cdiv(tokens, block_t),)](
            target,
            out,
            batch.token_slots,
            tokens,
            width,
            out.stride(0),
            SPLIT_K=split,
            BLOCK_T=block_t,
            BLOCK_N=max(16, next_power_of_2(width)),
        )
    return out


def lora_expand_add(
    y: torch.Tensor,
    shrunk: torch.Tensor,
    b: torch.Tensor,
    scales: torch.Tensor,
    bands: tuple[int, ...],
    batch: LoRABatch,
) -> None:
    """y [T, out] += scale * shrunk band j @ B band j^T for every band, each token with its
    slot's B; rows of base-model tokens are left as they are. `bands`: the output rows'
    band boundaries (0, ..., out); `scales` [S] float32."""
    lora_expand_add_with(y, shrunk, b, scales, bands, batch, expand_config(y.shape[0]))


def lora_expand_add_with(
    y: torch.Tensor,
    shrunk: torch.Tensor,
    b: torch.Tensor,
    scales: torch.Tensor,
    bands: tuple[int, ...],
    batch: LoRABatch,
    config: ExpandConfig,
) -> None:
    """lora_expand_add with given tiles (the benchmark's sweep)."""
    tokens, out_width = y.shape
    num_slots, rank = b.shape[0], b.shape[2]
    num_bands = len(bands) - 1
    _check_batch(batch, num_slots, tokens)
    if not 1 <= num_bands <= MAX_BANDS or bands[0] != 0 or bands[-1] != out_width or b.shape[1] != out_width:
        raise ValueError(
            f"bands {bands} must run from 0 to y's {out_width} columns (B's rows) in 1 to {MAX_BANDS} bands"
        )
    if shrunk.shape != (tokens, num_bands * rank) or shrunk.stride(1) != 1:
        raise ValueError(
            f"shrunk has shape {tuple(shrunk.shape)}; expected ({tokens}, {num_bands * rank}) contiguous"
        )
    if y.stride(1) != 1 or b.stride(2) != 1:
        raise ValueError("lora_expand_add needs rows of y and of B contiguous")
    if tokens == 0:
        return
    inner = list(bands[1:-1]) + [out_width] * (MAX_BANDS - num_bands)
    grid = (triton.cdiv(tokens, config.block_m) + num_slots, triton.cdiv(out_width, config.block_n))
    _expand_kernel[grid](
        y,
        shrunk,
        b,
        scales,
        batch.sorted_tokens,
        batch.slot_starts,
        tokens,
        num_slots,
        out_width,
        rank,
        inner[0],
        inner[1],
        y.stride(0),
        shrunk.stride(0),
        b.stride(0),
        b.stride(1),
        NUM_BANDS=num_bands,
        SEGMENTS=_segments(num_slots),
        PRECISION=_precision(shrunk.dtype),
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_R=max(16, next_power_of_2(rank)),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
