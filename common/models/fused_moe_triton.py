"""The mixture-of-experts experts' matmuls in Triton (CUDA; Triton's interpreter runs them on CPU in tests).

Same signature and results as fused_moe_reference.fused_moe: each token's k experts,
SiLU-gated MLPs, run on it and summed with the routing weights, [T, H] in x's dtype. The
reference loops over the experts on the host (it reads their token counts back); here the
whole call is a fixed sequence of launches whose grids depend only on T, k, E and the weight
shapes, so it can be captured in a CUDA graph with the rest of a decode step:

1. Align (`align_pairs`): the T*k (token, slot) pairs, numbered t*k + slot, are grouped by
   expert (in pair order within an expert, so the grouping is deterministic) and each
   expert's group padded to a whole number of BLOCK_M rows; padding holds the sentinel
   T*k. The counts come from a scatter_add and the positions from one small kernel (a
   program per expert that scans the pairs), all on the device: no .item(), .tolist() or
   bincount (which reads its size back on CUDA). The padded total is at most
   T*k + min(T*k, E)*(BLOCK_M - 1) (only experts that have pairs are padded, and at most
   T*k experts have them), so that bound sizes every buffer and grid; programs past the
   padded total, which only the device knows, return at once.
2. Gate/up (`_gate_up_kernel`): each program takes one BLOCK_M block (one expert's rows)
   and BLOCK_N intermediate columns, gathers its tokens' rows of x and multiplies them by
   the expert's gate rows and its up rows in the same K loop, then stores
   SiLU(gate) * up: the intermediate [T*k, I], by pair.
3. Down (`_down_kernel`): the intermediate rows of a block times the expert's w2ᵀ, times
   each pair's routing weight in the epilogue: [T*k, H], by pair.
4. The k rows of each token are summed by torch (fixed shapes, no atomics: deterministic),
   accumulating in fp32 and rounding once to x's dtype.

Rounding follows the reference's steps: gate and up are rounded to x's dtype before the
SiLU, the SiLU and the product each rounded as torch rounds them; the expert's output is
rounded to x's dtype and multiplied by the routing weight in fp32, which for a weight
already rounded to the model's dtype (Qwen3-MoE) is exactly the bf16 product torch forms,
and for an fp32 weight (Mixtral) the fp32 product: both reference rules with one formula.
fp32 inputs multiply in full fp32 (input_precision "ieee", never tf32), so the fp32 path
stays as exact as the reference's.

fp8 experts (--quantization fp8): w13/w2 as float8_e4m3fn with one fp32 scale per (expert,
output row), w13_scale [E, 2I] and w2_scale [E, H]. The kernels read the fp8 weight tiles,
convert them to x's dtype (exact: every e4m3 value is a bf16 value) for a bf16 tl.dot, and
apply the row scales to the fp32 accumulator after the K loop (a row's scale factors out of
its dot product). Weight-only dequantization, not fp8 x fp8 with per-token activation
scales, because decode, where MoE layers spend most of their steps, is bound by reading the
experts' weights: fp8 halves those bytes either way, while quantizing activations adds a
pass over them and a second rounding for no gain in that regime. fp8 x fp8 doubles the
tensor-core rate and so pays off only at prefill sizes; it is the next step if the benchmark
(pdserve bench moe-kernel) shows prefill compute-bound.

Tiles come from a small table by the rows an expert gets on average, T*k/E (MOE_CONFIGS):
decode gives each expert a row or two, so blocks of 16 rows and long K tiles that stream
the weights; prefill gives each hundreds, so larger blocks that reuse each weight tile.

Small batches (`fused_moe_small_batch`, at most SMALL_BATCH_MAX_TOKENS tokens) take three
launches from the router's logits instead: at one token the steps above spend more time
launching small kernels (torch's softmax and top-k, the align step's fills and scatter, the
sum over k) than reading the experts' weights. Routing (`select_experts`, a program per
token) gives fp32 weights and the ids; gate/up runs a GEMV per (token, slot) pair, with no
grouping by expert; down runs a program per (token, BLOCK_N columns) that loops over the
token's k slots and sums their weighted outputs itself. Each pair reads its expert's rows
on its own, so at larger batches, where pairs share experts, the grouped path above reads
the weights fewer times; the limit is where that starts to pay, to be set by measurement.
The roundings are those of the steps above, so the two paths agree to the fp32
accumulation order of the matmuls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from common.attention.triton_paged_tiles import next_power_of_2


@dataclass(frozen=True)
class MoeConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


# (most rows an expert gets on average, T*k/E; the tiles up to there), in ascending order.
# Shared memory per program stays under Hopper's 227 KB with bf16 weights; not tuned yet.
MOE_CONFIGS: list[tuple[float, MoeConfig]] = [
    (16, MoeConfig(16, 64, 128, num_warps=4, num_stages=4)),
    (64, MoeConfig(32, 64, 128, num_warps=4, num_stages=4)),
    (256, MoeConfig(64, 128, 64, num_warps=8, num_stages=3)),
    (float("inf"), MoeConfig(128, 64, 64, num_warps=8, num_stages=3)),
]
ALIGN_CHUNK = 1024  # pairs the align kernel reads per step of its scan


def moe_config(num_tokens: int, top_k: int, num_experts: int) -> MoeConfig:
    """The tiles of MOE_CONFIGS for T tokens routed to k of E experts each."""
    rows_per_expert = num_tokens * top_k / num_experts
    return next(config for bound, config in MOE_CONFIGS if rows_per_expert <= bound)


@dataclass(frozen=True)
class AlignedPairs:
    """The pairs grouped by expert, each group padded to whole blocks of block_m rows."""

    sorted_pairs: torch.Tensor  # int32 [capacity]: pair ids, the sentinel num_pairs as padding
    block_experts: torch.Tensor  # int32 [capacity / block_m]: the expert of each block (below total)
    total: torch.Tensor  # int32 [1]: rows in use (the padded groups' total), on the device
    num_pairs: int
    block_m: int

    @property
    def capacity(self) -> int:
        return self.sorted_pairs.shape[0]


def padded_capacity(num_pairs: int, num_experts: int, block_m: int) -> int:
    """The most rows the padded groups can take: every pair, and up to block_m - 1 padding
    rows for each expert that has a pair (at most min(num_pairs, num_experts) of them)."""
    return num_pairs + min(num_pairs, num_experts) * (block_m - 1)


@triton.jit
def _align_kernel(
    ids_ptr,  # [num_pairs] expert of each pair
    counts_ptr,  # int32 [num_experts] pairs of each expert
    sorted_ptr,  # int32 [capacity], the sentinel everywhere on entry
    block_experts_ptr,  # int32 [capacity / BLOCK_M]
    total_ptr,  # int32 [1]
    num_pairs,
    num_experts,
    BLOCK_M: tl.constexpr,
    EXPERTS: tl.constexpr,  # num_experts rounded up to a power of 2
    CHUNK: tl.constexpr,
):
    expert = tl.program_id(0)
    offs_e = tl.arange(0, EXPERTS)
    counts = tl.load(counts_ptr + offs_e, mask=offs_e < num_experts, other=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, 0)
    start = tl.sum(tl.where(offs_e == expert, ends - padded, 0), 0)
    end = tl.sum(tl.where(offs_e == expert, ends, 0), 0)
    if expert == 0:
        tl.store(total_ptr, tl.sum(padded, 0))
    for block in range(start // BLOCK_M, end // BLOCK_M):
        tl.store(block_experts_ptr + block, expert)
    # this expert's pairs, in pair order: each one's rank among them is a running count
    placed = start
    for chunk in range(0, num_pairs, CHUNK):
        offs = chunk + tl.arange(0, CHUNK)
        ids = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1)
        mine = (ids == expert).to(tl.int32)
        tl.store(sorted_ptr + placed + tl.cumsum(mine, 0) - 1, offs, mask=mine != 0)
        placed += tl.sum(mine, 0)


def align_pairs(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> AlignedPairs:
    """Group the (token, slot) pairs of topk_ids [T, k] by expert, each group padded to
    whole blocks of block_m rows; on the device, without reading anything back."""
    ids = topk_ids.reshape(-1)
    num_pairs = ids.shape[0]
    device = ids.device
    counts = torch.zeros(num_experts, dtype=torch.int32, device=device)
    counts.scatter_add_(0, ids.long(), torch.ones(num_pairs, dtype=torch.int32, device=device))
    capacity = triton.cdiv(padded_capacity(num_pairs, num_experts, block_m), block_m) * block_m
    sorted_pairs = torch.full((capacity,), num_pairs, dtype=torch.int32, device=device)
    block_experts = torch.empty(capacity // block_m, dtype=torch.int32, device=device)
    total = torch.empty(1, dtype=torch.int32, device=device)
    _align_kernel[(num_experts,)](
        ids,
        counts,
        sorted_pairs,
        block_experts,
        total,
        num_pairs,
        num_experts,
        BLOCK_M=block_m,
        EXPERTS=max(2, next_power_of_2(num_experts)),
        CHUNK=min(ALIGN_CHUNK, max(16, next_power_of_2(num_pairs))),
    )
    return AlignedPairs(sorted_pairs, block_experts, total, num_pairs, block_m)


@triton.jit
def _block_rows(sorted_ptr, block_experts_ptr, num_pairs, BLOCK_M: tl.constexpr):
    """(expert, pair ids [BLOCK_M], row mask) of this program's block, one in use."""
    pid_m = tl.program_id(0)
    expert = tl.load(block_experts_ptr + pid_m).to(tl.int64)
    pairs = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    return expert, pairs.to(tl.int64), pairs < num_pairs


@triton.jit
def _gate_up_kernel(
    x_ptr,  # [T, H]
    w13_ptr,  # [E, 2I, H]: gate rows, then up rows
    w13_scale_ptr,  # fp32 [E, 2I] (FP8)
    h_ptr,  # [T*k, I] out: silu(gate) * up, by pair
    sorted_ptr,
    block_experts_ptr,
    total_ptr,
    num_pairs,
    top_k,
    hidden,
    inter,
    stride_x,
    stride_we,
    stride_wn,
    stride_se,
    stride_h,
    FP8: tl.constexpr,
    EVEN_K: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    if tl.program_id(0) * BLOCK_M >= tl.load(total_ptr):
        return  # past the padded groups: the grid is sized for the most there can be
    expert, pairs, row_mask = _block_rows(sorted_ptr, block_experts_ptr, num_pairs, BLOCK_M)
    tokens = pairs // top_k
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < inter
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tokens[:, None] * stride_x + offs_k[None, :]
    # the weight tiles read as [BLOCK_K, BLOCK_N]: the dot's right operand, W^T
    gate_ptrs = w13_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]
    up_ptrs = gate_ptrs + inter * stride_wn
    gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        if EVEN_K:
            xs = tl.load(x_ptrs, mask=row_mask[:, None], other=0.0)
            wg = tl.load(gate_ptrs, mask=n_mask[None, :], other=0.0)
            wu = tl.load(up_ptrs, mask=n_mask[None, :], other=0.0)
        else:
            k_mask = k0 + offs_k < hidden
            xs = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            wg = tl.load(gate_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            wu = tl.load(up_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        gate = tl.dot(xs, wg.to(xs.dtype), gate, input_precision=PRECISION)
        up = tl.dot(xs, wu.to(xs.dtype), up, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        gate_ptrs += BLOCK_K
        up_ptrs += BLOCK_K
    if FP8:
        scales = w13_scale_ptr + expert * stride_se + offs_n
        gate = gate * tl.load(scales, mask=n_mask, other=0.0)[None, :]
        up = up * tl.load(scales + inter, mask=n_mask, other=0.0)[None, :]
    dtype = h_ptr.dtype.element_ty
    # rounded where the reference's torch ops round: gate and up, the SiLU, the product
    gate = gate.to(dtype).to(tl.float32)
    up = up.to(dtype).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    h_ptrs = h_ptr + pairs[:, None] * stride_h + offs_n[None, :]
    tl.store(h_ptrs, (act * up).to(dtype), mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def _down_kernel(
    h_ptr,  # [T*k, I]
    w2_ptr,  # [E, H, I]
    w2_scale_ptr,  # fp32 [E, H] (FP8)
    weights_ptr,  # [T*k] routing weight of each pair
    out_ptr,  # [T*k, H] out: weight * down(h), by pair
    sorted_ptr,
    block_experts_ptr,
    total_ptr,
    num_pairs,
    hidden,
    inter,
    stride_h,
    stride_we,
    stride_wn,
    stride_se,
    stride_out,
    FP8: tl.constexpr,
    EVEN_K: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    if tl.program_id(0) * BLOCK_M >= tl.load(total_ptr):
        return  # past the padded groups: the grid is sized for the most there can be
    expert, pairs, row_mask = _block_rows(sorted_ptr, block_experts_ptr, num_pairs, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < hidden
    offs_k = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + pairs[:, None] * stride_h + offs_k[None, :]
    w_ptrs = w2_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        if EVEN_K:
            hs = tl.load(h_ptrs, mask=row_mask[:, None], other=0.0)
            ws = tl.load(w_ptrs, mask=n_mask[None, :], other=0.0)
        else:
            k_mask = k0 + offs_k < inter
            hs = tl.load(h_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            ws = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(hs, ws.to(hs.dtype), acc, input_precision=PRECISION)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if FP8:
        acc = acc * tl.load(w2_scale_ptr + expert * stride_se + offs_n, mask=n_mask, other=0.0)[None, :]
    dtype = out_ptr.dtype.element_ty
    weight = tl.load(weights_ptr + pairs, mask=row_mask, other=0.0).to(tl.float32)
    # the expert's output in x's dtype, times the weight in fp32, rounded once (see above)
    out = acc.to(dtype).to(tl.float32) * weight[:, None]
    out_ptrs = out_ptr + pairs[:, None] * stride_out + offs_n[None, :]
    tl.store(out_ptrs, out.to(dtype), mask=row_mask[:, None] & n_mask[None, :])


def _precision(dtype: torch.dtype) -> str:
    """fp32 inputs multiply in full fp32, as the reference's torch matmuls do; 16-bit ones
    ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _check(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale) -> None:
    _check_experts(x, w13, w2, w13_scale, w2_scale)
    if topk_weights.shape != topk_ids.shape or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(
            f"topk_weights {tuple(topk_weights.shape)} and topk_ids {tuple(topk_ids.shape)} must both "
            f"be [T, k] with T = {x.shape[0]}, x's rows"
        )


def _check_experts(x, w13, w2, w13_scale, w2_scale) -> None:
    experts, two_inter, hidden = w13.shape
    if x.dim() != 2 or x.shape[1] != hidden or tuple(w2.shape) != (experts, hidden, two_inter // 2):
        raise ValueError(
            f"fused_moe needs x [T, H], w13 [E, 2I, H] and w2 [E, H, I]; got x {tuple(x.shape)}, "
            f"w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}"
        )
    if x.stride(1) != 1 or w13.stride(2) != 1 or w2.stride(2) != 1:
        raise ValueError("fused_moe needs the last dimension of x, w13 and w2 contiguous")
    fp8 = w13.dtype == torch.float8_e4m3fn
    if fp8 != (w13_scale is not None) or (w2.dtype == torch.float8_e4m3fn) != (w2_scale is not None):
        raise ValueError(
            "fp8 expert weights need their scales (w13_scale [E, 2I], w2_scale [E, H]) and only fp8 ones take "
            f"scales; got w13 {w13.dtype} with{'out' if w13_scale is None else ''} scales, "
            f"w2 {w2.dtype} with{'out' if w2_scale is None else ''} scales"
        )
    if fp8 and (
        tuple(w13_scale.shape) != (experts, two_inter)
        or tuple(w2_scale.shape) != (experts, hidden)
        or w13_scale.stride(1) != 1
        or w2_scale.stride(1) != 1
    ):
        raise ValueError(
            f"fp8 scales must be w13_scale [{experts}, {two_inter}] and w2_scale [{experts}, {hidden}] with "
            f"contiguous rows; got {tuple(w13_scale.shape)} and {tuple(w2_scale.shape)}"
        )


def fused_moe(
    x: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2I, H]: each expert's gate rows, then its up rows
    w2: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, k]
    topk_ids: torch.Tensor,  # [T, k]
    w13_scale: torch.Tensor | None = None,  # fp32 [E, 2I] when w13 is fp8
    w2_scale: torch.Tensor | None = None,  # fp32 [E, H] when w2 is fp8
    config: MoeConfig | None = None,
) -> torch.Tensor:
    """sum over each token's k experts of weight * down(silu(gate(x)) * up(x)), [T, H] in x's
    dtype (fused_moe_reference.fused_moe's rules); `config` overrides the tile table."""
    _check(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale)
    tokens, top_k = topk_ids.shape
    experts, hidden, inter = w2.shape
    if tokens == 0:
        return torch.zeros_like(x)
    config = config or moe_config(tokens, top_k, experts)
    aligned = align_pairs(topk_ids, experts, config.block_m)
    num_pairs = aligned.num_pairs
    blocks = aligned.capacity // config.block_m
    fp8 = w13_scale is not None
    precision = _precision(x.dtype)
    h = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    _gate_up_kernel[(blocks, triton.cdiv(inter, config.block_n))](
        x,
        w13,
        w13_scale if fp8 else w13,
        h,
        aligned.sorted_pairs,
        aligned.block_experts,
        aligned.total,
        num_pairs,
        top_k,
        hidden,
        inter,
        x.stride(0),
        w13.stride(0),
        w13.stride(1),
        w13_scale.stride(0) if fp8 else 0,
        h.stride(0),
        FP8=fp8,
        EVEN_K=hidden % config.block_k == 0,
        PRECISION=precision,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    per_pair = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)
    _down_kernel[(blocks, triton.cdiv(hidden, config.block_n))](
        h,
        w2,
        w2_scale if fp8 else w2,
        topk_weights.reshape(-1).contiguous(),
        per_pair,
        aligned.sorted_pairs,
        aligned.block_experts,
        aligned.total,
        num_pairs,
        hidden,
        inter,
        h.stride(0),
        w2.stride(0),
        w2.stride(1),
        w2_scale.stride(0) if fp8 else 0,
        per_pair.stride(0),
        FP8=fp8,
        EVEN_K=inter % config.block_k == 0,
        PRECISION=precision,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    # each token's k rows summed in fp32, rounded once: the same order on every run
    return per_pair.view(tokens, top_k, hidden).sum(dim=1, dtype=torch.float32).to(x.dtype)


# --- small batches: three launches from the router's logits ---------------------------------

SMALL_BATCH_MAX_TOKENS = 16


@dataclass(frozen=True)
class SmallBatchConfig:
    """Tiles of the small-batch kernels. The defaults give Qwen3-30B-A3B (H 2048, I 768, k 8)
    at one token about a program per SM in each matmul: 8 pairs x 24 gate/up column blocks,
    128 down column blocks. Not tuned yet."""

    gate_up_block_n: int = 32
    down_block_n: int = 16
    block_k: int = 128
    num_warps: int = 4


@triton.jit
def _select_experts_kernel(
    logits_ptr,  # [T, E]
    weights_ptr,  # fp32 [T, TOP_K] out
    ids_ptr,  # int64 [T, TOP_K] out
    num_experts,
    stride_lt,
    stride_le,
    RENORMALIZE: tl.constexpr,
    TOP_K: tl.constexpr,
    EXPERTS: tl.constexpr,  # num_experts rounded up to a power of 2
    SLOTS: tl.constexpr,  # TOP_K rounded up to a power of 2
):
    token = tl.program_id(0)
    offs_e = tl.arange(0, EXPERTS)
    logits = tl.load(
        logits_ptr + token * stride_lt + offs_e * stride_le, mask=offs_e < num_experts, other=float("-inf")
    ).to(tl.float32)
    exps = tl.exp(logits - tl.max(logits, 0))
    # correctly rounded division, as torch's; Triton's `/` on fp32 is an approximate one on CUDA
    probs = tl.math.div_rn(exps, tl.sum(exps, 0))
    offs_s = tl.arange(0, SLOTS)
    weights = tl.zeros([SLOTS], dtype=tl.float32)
    ids = tl.zeros([SLOTS], dtype=tl.int64)
    for slot in tl.static_range(TOP_K):
        best = tl.max(probs, 0)
        # ties go to the lower expert id; padding (probability 0) sits above every real id
        expert = tl.min(tl.where(probs == best, offs_e, EXPERTS), 0)
        weights = tl.where(offs_s == slot, best, weights)
        ids = tl.where(offs_s == slot, expert, ids)
        probs = tl.where(offs_e == expert, -1.0, probs)
    if RENORMALIZE:
        weights = tl.math.div_rn(weights, tl.broadcast_to(tl.sum(weights, 0), [SLOTS]))
    tl.store(weights_ptr + token * TOP_K + offs_s, weights, mask=offs_s < TOP_K)
    tl.store(ids_ptr + token * TOP_K + offs_s, ids, mask=offs_s < TOP_K)


@triton.jit
def _pair_gate_up_kernel(
    x_ptr,  # [T, H]
    w13_ptr,  # [E, 2I, H]: gate rows, then up rows
    w13_scale_ptr,  # fp32 [E, 2I] (FP8)
    ids_ptr,  # [T*k] expert of each pair
    h_ptr,  # [T*k, I] out: silu(gate) * up, by pair
    top_k,
    hidden,
    inter,
    stride_x,
    stride_we,
    stride_wn,
    stride_se,
    stride_h,
    FP8: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pair = tl.program_id(0)
    token = pair // top_k
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < inter
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + token * stride_x + offs_k
    gate_ptrs = w13_ptr + expert * stride_we + offs_n[:, None] * stride_wn + offs_k[None, :]
    up_ptrs = gate_ptrs + inter * stride_wn
    # a GEMV: products summed across K once, after the loop
    gate = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        if EVEN_K:
            xs = tl.load(x_ptrs)
            wg = tl.load(gate_ptrs, mask=n_mask[:, None], other=0.0)
            wu = tl.load(up_ptrs, mask=n_mask[:, None], other=0.0)
        else:
            k_mask = k0 + offs_k < hidden
            xs = tl.load(x_ptrs, mask=k_mask, other=0.0)
            wg = tl.load(gate_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            wu = tl.load(up_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        xs = xs.to(tl.float32)[None, :]
        gate += wg.to(tl.float32) * xs
        up += wu.to(tl.float32) * xs
        x_ptrs += BLOCK_K
        gate_ptrs += BLOCK_K
        up_ptrs += BLOCK_K
    gate = tl.sum(gate, 1)
    up = tl.sum(up, 1)
    if FP8:
        scales = w13_scale_ptr + expert * stride_se + offs_n
        gate = gate * tl.load(scales, mask=n_mask, other=0.0)
        up = up * tl.load(scales + inter, mask=n_mask, other=0.0)
    dtype = h_ptr.dtype.element_ty
    # rounded as _gate_up_kernel rounds: gate and up, the SiLU, the product
    gate = gate.to(dtype).to(tl.float32)
    up = up.to(dtype).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(h_ptr + pair * stride_h + offs_n, (act * up).to(dtype), mask=n_mask)


@triton.jit
def _token_down_kernel(
    h_ptr,  # [T*k, I]
    w2_ptr,  # [E, H, I]
    w2_scale_ptr,  # fp32 [E, H] (FP8)
    weights_ptr,  # fp32 [T*k] routing weight of each pair
    ids_ptr,  # [T*k] expert of each pair
    out_ptr,  # [T, H] out: the weighted sum over the token's k experts
    top_k,
    hidden,
    inter,
    stride_h,
    stride_we,
    stride_wn,
    stride_se,
    stride_out,
    FP8: tl.constexpr,
    WEIGHTS_IN_MODEL_DTYPE: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    token = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < hidden
    offs_k = tl.arange(0, BLOCK_K)
    dtype = out_ptr.dtype.element_ty
    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    for slot in range(top_k):  # in slot order, so every run sums in the same order
        pair = token * top_k + slot
        expert = tl.load(ids_ptr + pair).to(tl.int64)
        h_ptrs = h_ptr + pair * stride_h + offs_k
        w_ptrs = w2_ptr + expert * stride_we + offs_n[:, None] * stride_wn + offs_k[None, :]
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, inter, BLOCK_K):
            if EVEN_K:
                hs = tl.load(h_ptrs)
                ws = tl.load(w_ptrs, mask=n_mask[:, None], other=0.0)
            else:
                k_mask = k0 + offs_k < inter
                hs = tl.load(h_ptrs, mask=k_mask, other=0.0)
                ws = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            acc += ws.to(tl.float32) * hs.to(tl.float32)[None, :]
            h_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        expert_out = tl.sum(acc, 1)
        if FP8:
            scales = w2_scale_ptr + expert * stride_se + offs_n
            expert_out = expert_out * tl.load(scales, mask=n_mask, other=0.0)
        weight = tl.load(weights_ptr + pair)
        if WEIGHTS_IN_MODEL_DTYPE:  # Qwen3-MoE: the weight rounded to the model's dtype first
            weight = weight.to(dtype).to(tl.float32)
        # as _down_kernel: the expert's output in x's dtype, times the weight, rounded once;
        # then, as fused_moe's sum over k, accumulated in fp32 and rounded once at the end
        total += (expert_out.to(dtype).to(tl.float32) * weight).to(dtype).to(tl.float32)
    tl.store(out_ptr + token * stride_out + offs_n, total.to(dtype), mask=n_mask)


def select_experts(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """fused_moe_reference.select_experts in one launch, a program per token: (topk_weights
    [T, k] float32, topk_ids [T, k] int64) from router_logits [T, E] of any float dtype.

    Ties go to the lower expert id, in the ids and in their order. torch.topk promises no
    order for ties (on the CPU it does not take the lower ids first), so on logits with
    exactly equal probabilities the two may pick different experts of equal weight."""
    if router_logits.dim() != 2 or not 0 < top_k <= router_logits.shape[1]:
        raise ValueError(
            f"select_experts needs router_logits [T, E] and 0 < top_k <= E; got {tuple(router_logits.shape)} "
            f"and top_k {top_k}"
        )
    tokens, experts = router_logits.shape
    weights = torch.empty(tokens, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(tokens, top_k, dtype=torch.int64, device=router_logits.device)
    if tokens == 0:
        return weights, ids
    _select_experts_kernel[(tokens,)](
        router_logits,
        weights,
        ids,
        experts,
        router_logits.stride(0),
        router_logits.stride(1),
        RENORMALIZE=renormalize,
        TOP_K=top_k,
        EXPERTS=max(2, next_power_of_2(experts)),
        SLOTS=max(2, next_power_of_2(top_k)),
    )
    return weights, ids


def fused_moe_small_batch(
    x: torch.Tensor,  # [T, H], T <= SMALL_BATCH_MAX_TOKENS
    w13: torch.Tensor,  # [E, 2I, H]: each expert's gate rows, then its up rows
    w2: torch.Tensor,  # [E, H, I]
    router_logits: torch.Tensor,  # [T, E]
    top_k: int,
    renormalize: bool,
    weights_in_model_dtype: bool,  # Qwen3-MoE: routing weights rounded to x's dtype before weighting
    w13_scale: torch.Tensor | None = None,  # fp32 [E, 2I] when w13 is fp8
    w2_scale: torch.Tensor | None = None,  # fp32 [E, H] when w2 is fp8
    config: SmallBatchConfig | None = None,
) -> torch.Tensor:
    """select_experts then fused_moe, [T, H] in x's dtype, in three launches: routing, gate/up
    by (token, slot) pair, down with each token's sum over its k experts."""
    _check_experts(x, w13, w2, w13_scale, w2_scale)
    tokens = x.shape[0]
    experts, hidden, inter = w2.shape
    if tokens > SMALL_BATCH_MAX_TOKENS:
        raise ValueError(
            f"fused_moe_small_batch takes at most {SMALL_BATCH_MAX_TOKENS} tokens, got {tokens}; "
            "larger batches take fused_moe"
        )
    if tuple(router_logits.shape) != (tokens, experts):
        raise ValueError(
            f"router_logits must be [T, E] = [{tokens}, {experts}] (x's rows, w13's experts); "
            f"got {tuple(router_logits.shape)}"
        )
    weights, ids = select_experts(router_logits, top_k, renormalize)
    out = torch.empty(tokens, hidden, dtype=x.dtype, device=x.device)
    if tokens == 0:
        return out
    config = config or SmallBatchConfig()
    fp8 = w13_scale is not None
    h = torch.empty(tokens * top_k, inter, dtype=x.dtype, device=x.device)
    _pair_gate_up_kernel[(tokens * top_k, triton.cdiv(inter, config.gate_up_block_n))](
        x,
        w13,
        w13_scale if fp8 else w13,
        ids,
        h,
        top_k,
        hidden,
        inter,
        x.stride(0),
        w13.stride(0),
        w13.stride(1),
        w13_scale.stride(0) if fp8 else 0,
        h.stride(0),
        FP8=fp8,
        EVEN_K=hidden % config.block_k == 0,
        BLOCK_N=config.gate_up_block_n,
        BLOCK_K=config.block_k,
        num_warps=config.num_warps,
    )
    _token_down_kernel[(tokens, triton.cdiv(hidden, config.down_block_n))](
        h,
        w2,
        w2_scale if fp8 else w2,
        weights,
        ids,
        out,
        top_k,
        hidden,
        inter,
        h.stride(0),
        w2.stride(0),
        w2.stride(1),
        w2_scale.stride(0) if fp8 else 0,
        out.stride(0),
        FP8=fp8,
        WEIGHTS_IN_MODEL_DTYPE=weights_in_model_dtype,
        EVEN_K=inter % config.block_k == 0,
        BLOCK_N=config.down_block_n,
        BLOCK_K=config.block_k,
        num_warps=config.num_warps,
    )
    return out
