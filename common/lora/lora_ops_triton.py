"""The batched LoRA matmuls in Triton (CUDA; Triton's interpreter runs them on CPU in tests).

Same signatures and results as lora_ops.py, the torch reference: lora_shrink gives
x [T, in] @ A[slot of t]^T as [T, n R], lora_expand_add adds scale * shrunk band j @ B band
j^T into y. Each launch serves every adapter of the step, in the spirit of Punica's SGMV and
S-LoRA: the step's tokens, grouped by slot in LoRABatch.sorted_tokens, are cut into tiles of
BLOCK_M tokens of one slot; a program gathers its tile's rows, multiplies them by its slot's
weight tile with tl.dot and writes (or adds) them back at the same rows. A token lies in one
tile, so no two programs write one element of the output.

CUDA-graph safe: the grids depend only on T, the slot count S and the weight shapes, never
on how the tokens spread over the slots. Each program finds its tile from slot_starts on the
device (a cumulative sum of the slots' tile counts, S + 1 entries), so the grid has
cdiv(T, BLOCK_M) + S + 1 tiles however the tokens spread: one slot of T tokens, or T slots
of one, each leaves at most S + 1 programs idle, where a grid of cdiv(T, BLOCK_M) tiles per
slot would leave up to S times the useful ones idle.

The shrink reads little weight (n R rows of A per slot) against a long K, so at decode
sizes a handful of tiles would stream all of K alone: it splits K over SPLIT_K programs
that write fp32 partial sums, and the last of a tile's SPLIT_K programs to arrive adds them
up (in split order, so the result does not depend on who came last) and writes the tile in
x's dtype. That takes one launch, not a second kernel for the sum: at decode a linear's
LoRA is two launches (shrink, expand), and launches, not bytes, are most of its time
(docs/benchmarks.md, LoRA kernels). Each program counts its arrival on its tile's int32
counter with an acq_rel atomic after a CTA barrier (its partial is then visible to whoever
arrives last); the last one resets the counter to 0, so the next call, or a CUDA graph's
next replay, finds the counters zeroed without a memset launch. The counters live in one
buffer per device (_arrivals), grown outside any capture: calls on one device must not run
on two streams at once. A capture that finds the buffer too small (no call at its size
outside a capture before it, as the engine's warm-up makes) runs the shrink unsplit rather
than allocate inside the graph: slower at decode, never wrong.
Programs of a last segment (the base-model tokens) write the zero rows.

Programmatic dependent launch (Hopper on, as the decode path's other kernels): each kernel
may start while the previous one drains; it waits for its predecessor's writes
(pdl_wait) before reading anything a kernel may have written, and before that asks L2 for
the weight tiles it will read (its adapter's A or B lines: weights no kernel of the step
writes). The slot of that prefetch is read before the wait, so it is a hint only: the tile
is found again after the wait.

The kernels read no adapter rank: a slot's rows of A past its rank (and so its shrunk
columns past the rank) must be zero, as the slot loader leaves them; the torch reference
slices them off instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from common.attention.triton_paged_tiles import next_power_of_2, num_sms, pdl_enabled, pdl_wait
from common.lora.lora_ops import LoRABatch

MAX_BANDS = 3  # the fused qkv projection's q, k, v
# Under programmatic dependent launch, prefetch each program's weight tile into L2 before
# waiting for the previous kernel (False: wait first, as without PDL).
PREFETCH_WEIGHTS = True
MAX_PREFETCH_LINES = 16  # 128-byte lines of each A row a shrink program prefetches, at most


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
    several slots (each slot's last tile is partly empty). On an H100, 64 decode tokens over 8
    adapters: Llama-3-8B's down shrink takes 12.2 us split 32 ways (the sum included), 50.0
    unsplit (docs/benchmarks.md, LoRA kernels)."""
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
    # through L2 only (.cg): a read before pdl_wait must leave no line in L1 that a read
    # after it could find stale
    lo = tl.load(starts_ptr + seg, mask=seg <= num_slots, other=0, cache_modifier=".cg")
    hi = tl.load(starts_ptr + seg + 1, mask=seg < num_slots, other=0, cache_modifier=".cg")
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
def _prefetch_l2(ptrs):
    """Ask L2 for the 128-byte lines holding ptrs (a hint: no value comes back)."""
    tl.inline_asm_elementwise(
        "prefetch.global.L2 [$1]; // $0", "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1
    )


@triton.jit
def _shrink_kernel(
    x_ptr,
    a_ptr,
    out_ptr,
    partial_ptr,  # fp32 [SPLIT_K, T, width] by sorted position (SPLIT_K > 1)
    arrivals_ptr,  # int32, one per (tile, column tile), zero between calls (SPLIT_K > 1)
    sorted_ptr,
    starts_ptr,
    num_tokens,
    num_slots,
    width,
    k,
    x_stride,
    a_stride_slot,
    a_stride_row,
    out_stride,
    split_stride,  # T * width: one split's partials
    k_per_split,
    SPLIT_K: tl.constexpr,
    SEGMENTS: tl.constexpr,
    EVEN_K: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
    PREFETCH_LINES: tl.constexpr,  # 0: no prefetch
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    n_tiles = tl.cdiv(width, BLOCK_N)
    split = pid_n // n_tiles
    pid_n = pid_n % n_tiles
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < width
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, k)
    if PREFETCH_LINES > 0:
        # this program's lines of A (64 16-bit values to a line), for the slot that
        # slot_starts names before the wait: a hint, in bounds whatever it reads
        hint, _, _ = _slot_tile(pid_m, starts_ptr, num_slots, num_tokens, True, SEGMENTS, BLOCK_M)
        hint = tl.minimum(hint, num_slots - 1).to(tl.int64)
        lines = tl.minimum(k_lo + tl.arange(0, PREFETCH_LINES) * 64, k - 1)
        rows_n = tl.minimum(offs_n, width - 1)
        _prefetch_l2(a_ptr + hint * a_stride_slot + rows_n[:, None] * a_stride_row + lines[None, :])
    pdl_wait(PDL)
    slot, start, end = _slot_tile(pid_m, starts_ptr, num_slots, num_tokens, True, SEGMENTS, BLOCK_M)
    if start >= end:
        return
    offs_m = start + tl.arange(0, BLOCK_M)
    row_mask = offs_m < end
    rows = tl.load(sorted_ptr + offs_m, mask=row_mask, other=0).to(tl.int64)
    out_ptrs = out_ptr + rows[:, None] * out_stride + offs_n[None, :]
    out_mask = row_mask[:, None] & n_mask[None, :]
    if slot == num_slots:  # the base-model tokens: zero rows, written once
        if split == 0:
            tl.store(out_ptrs, tl.zeros([BLOCK_M, BLOCK_N], dtype=out_ptr.dtype.element_ty), mask=out_mask)
        return
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * x_stride + offs_k[None, :]
    # A's tile read as [BLOCK_K, BLOCK_N]: the dot's right operand, A^T
    a_ptrs = a_ptr + slot.to(tl.int64) * a_stride_slot + offs_n[None, :] * a_stride_row + offs_k[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if EVEN_K:
            xs = tl.load(x_ptrs + k0, mask=row_mask[:, None], other=0.0)
            ws = tl.load(a_ptrs + k0, mask=n_mask[None, :], other=0.0)
        else:
            k_mask = k0 + offs_k < k_hi
            xs = tl.load(x_ptrs + k0, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            ws = tl.load(a_ptrs + k0, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(xs, ws.to(xs.dtype), acc, input_precision=PRECISION)
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
        return
    part_ptrs = partial_ptr + offs_m.to(tl.int64)[:, None] * width + offs_n[None, :]
    tl.store(part_ptrs + split.to(tl.int64) * split_stride, acc, mask=out_mask)
    # every thread's partial stored before one thread's release: the barrier orders them in
    # the CTA, the gpu-scope acq_rel atomic publishes them (and, for the last program,
    # makes the others' partials visible), as cooperative groups' grid sync does
    tl.debug_barrier()
    arrival = arrivals_ptr + pid_m * n_tiles + pid_n
    arrived = tl.atomic_add(arrival, 1, sem="acq_rel", scope="gpu")
    if arrived == SPLIT_K - 1:
        tl.debug_barrier()
        total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for _ in range(SPLIT_K):  # split order: the same sum whichever program came last
            # .cg: from L2, where the other programs' partials are, never a stale L1 line
            total += tl.load(part_ptrs, mask=out_mask, other=0.0, cache_modifier=".cg")
            part_ptrs += split_stride
        tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=out_mask)
        tl.store(arrival, 0)  # zero for the next call or replay


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
    PDL: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    n_lo = tl.program_id(1) * BLOCK_N
    offs_n = n_lo + tl.arange(0, BLOCK_N)
    n_mask = offs_n < out_width
    if PREFETCH:
        # the first line of each of this program's B rows (a whole row at ranks up to 64),
        # for the slot that slot_starts names before the wait: a hint
        hint, _, _ = _slot_tile(tl.program_id(0), starts_ptr, num_slots, num_tokens, False, SEGMENTS, BLOCK_M)
        hint = tl.minimum(hint, num_slots - 1).to(tl.int64)
        _prefetch_l2(b_ptr + hint * b_stride_slot + tl.minimum(offs_n, out_width - 1) * b_stride_row)
    pdl_wait(PDL)
    slot, start, end = _slot_tile(
        tl.program_id(0), starts_ptr, num_slots, num_tokens, False, SEGMENTS, BLOCK_M
    )
    if start >= end:
        return
    offs_m = start + tl.arange(0, BLOCK_M)
    row_mask = offs_m < end
    rows = tl.load(sorted_ptr + offs_m, mask=row_mask, other=0).to(tl.int64)
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
    tiles = triton.cdiv(tokens, config.block_m) + num_slots + 1
    n_tiles = triton.cdiv(width, config.block_n)
    split = config.split_k
    arrivals = _arrivals(x.device, tiles * n_tiles) if split > 1 else None
    if arrivals is None:
        split = 1
    k_per_split = triton.cdiv(triton.cdiv(k, split), config.block_k) * config.block_k
    partial = torch.empty(split, tokens, width, dtype=torch.float32, device=x.device) if split > 1 else out
    pdl = pdl_enabled(x.device)
    lines = min(MAX_PREFETCH_LINES, next_power_of_2(triton.cdiv(k_per_split * x.element_size(), 128)))
    _shrink_kernel[(tiles, n_tiles * split)](
        x,
        a,
        out,
        partial,
        arrivals if arrivals is not None else out,
        batch.sorted_tokens,
        batch.slot_starts,
        tokens,
        num_slots,
        width,
        k,
        x.stride(0),
        a.stride(0),
        a.stride(1),
        out.stride(0),
        tokens * width,
        k_per_split,
        SPLIT_K=split,
        SEGMENTS=_segments(num_slots),
        EVEN_K=k % config.block_k == 0,  # then every split starts and ends on a whole block
        PRECISION=_precision(x.dtype),
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        PDL=pdl,
        PREFETCH_LINES=lines if pdl and PREFETCH_WEIGHTS else 0,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **({"launch_pdl": True} if pdl else {}),
    )
    return out


_arrival_buffers: dict[torch.device, torch.Tensor] = {}
_outgrown: list[torch.Tensor] = []  # kept alive: a captured graph may still count on one


def _arrivals(device: torch.device, count: int) -> torch.Tensor | None:
    """The device's split-K arrival counters, at least `count`, all zero between calls (each
    tile's last program resets its own); None while a CUDA graph is being captured on a
    buffer too small, which is not grown there (its zeroing would join the graph)."""
    buffer = _arrival_buffers.get(device)
    if buffer is None or buffer.numel() < count:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        if buffer is not None:
            _outgrown.append(buffer)
        size = max(1024, next_power_of_2(count))
        buffer = torch.zeros(size, dtype=torch.int32, device=device)
        _arrival_buffers[device] = buffer
    return buffer


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
    pdl = pdl_enabled(y.device)
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
        PDL=pdl,
        PREFETCH=pdl and PREFETCH_WEIGHTS,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **({"launch_pdl": True} if pdl else {}),
    )
