"""Triton kernels for the decoder's layers on CUDA: one launch where eager torch makes many,
and a matmul for the few rows of a small decode batch.

A decode step at batch 1 is a chain of small launches between the weight reads; in eager
torch RMSNorm is 8 kernels, the residual add 1 more, RoPE on q and k 18 and SiLU-and-mul 2,
and inside a CUDA graph each still costs a couple of microseconds. Here each is one
kernel: RMSNorm with the residual add folded in, RoPE on q and k in place, SiLU-and-mul.
RoPE with the K/V cache write (rotary_write_kv) takes Qwen3's per-head q/k RMSNorm too,
which eager torch runs as 8 kernels for each of q and k.

small_m_matmul serves x [M <= 16, K] @ W[N, K]^T, where the step only streams W: every
program reads a band of W's rows through a pipelined loop (tile shapes tuned on the device
per weight shape), with x padded to the 16 rows tl.dot needs. With `gate_up_silu` each
program streams a band of the gate rows and the matching band of the up rows and applies
SiLU-and-mul to the two results before storing them: a decode step's MLP launches no
SiLU-and-mul kernel.

With an fp8 weight (float8_e4m3fn [N, K] and fp32 per-row scales [N], the layout of
common/models/fp8_weights.py) the same kernel reads a byte a weight: each tile loads as fp8,
widens to x's dtype in registers, goes through the same dot with fp32 accumulation, and the
row scales multiply the accumulator once after the K loop. Weight-only: x is never quantized,
since at M <= 16 the step is bound by reading W and quantizing x would cost launches and a
second rounding (the scheme of common/models/fused_moe_triton.py's fp8 experts).

Rounding follows the torch modules in common/models/layers.py step by step (the residual
sum and the normalized value are rounded to the model's dtype where torch rounds them;
RoPE's cos/sin and each product are rounded as torch's bf16/fp16 ops round them), so the
two paths differ only in reduction order and exp/rsqrt approximations.
"""

from __future__ import annotations

import inspect

import torch
import triton
import triton.language as tl

from common.attention.reference import FP8_DTYPES, FP8_E4M3_MAX
from common.attention.triton_paged_tiles import pdl_enabled, pdl_wait, rope_rows
from common.attention.triton_write_kv import fp8_scaled

FP8_WEIGHT_DTYPE = torch.float8_e4m3fn  # the fp8 weights small_m_matmul reads (with row scales)
SMALL_M = 16  # rows of x one small_m_matmul program holds (tl.dot needs at least 16)
# Under programmatic dependent launch, each small_m_matmul program asks L2 for the first this
# many 128-byte lines of each of its weight rows before waiting for the previous kernel: the
# weights do not depend on it, so their first reads overlap its tail. 0: no prefetch.
PREFETCH_LINES = 8  # 5.86 -> 5.82 ms a batch-1 step on the H100 (docs/benchmarks.md)


def _launch_options(device: torch.device) -> dict:
    """PDL constexpr and launch option for a decode-path kernel on this device."""
    pdl = pdl_enabled(device)
    return {"PDL": pdl, "launch_pdl": True} if pdl else {"PDL": False}


def _next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    stride_x,
    stride_r,
    stride_o,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # residual <- x + residual, rounded to the model's dtype as torch's add rounds it
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(residual_ptr + row * stride_r + cols, x, mask=mask)
    xf = x.to(tl.float32)
    variance = tl.sum(xf * xf, axis=0) / n_cols
    normed = (xf * tl.rsqrt(variance + eps)).to(x.dtype)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    y = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """weight * RMSNorm(x) over the last dim of a 2-D x; with `residual`, of x + residual,
    and that sum is written back into `residual` (which must be contiguous)."""
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"rms_norm takes rows [tokens, hidden] contiguous in hidden; got {tuple(x.shape)}")
    rows, cols = x.shape
    out = torch.empty((rows, cols), dtype=torch.result_type(weight, x), device=x.device)
    if rows == 0:
        return out
    if residual is not None and (residual.shape != x.shape or residual.stride(-1) != 1):
        raise ValueError(f"residual {tuple(residual.shape)} must match x {tuple(x.shape)}")
    block = _next_power_of_2(cols)
    _rms_norm_kernel[(rows,)](
        x,
        residual if residual is not None else x,
        weight,
        out,
        x.stride(0),
        residual.stride(0) if residual is not None else 0,
        out.stride(0),
        cols,
        float(eps),
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=8 if block >= 4096 else 4,
        **_launch_options(x.device),
    )
    return out


@triton.jit
def _rotate_pair(x1, x2, cos, sin):
    """(x1 cos - x2 sin, x2 cos + x1 sin) in x1's dtype, rounded where torch's ops round."""
    return rope_rows(x1, x2, cos, sin, -1.0), rope_rows(x2, x1, cos, sin, 1.0)


@triton.jit
def _norm_heads(x1, x2, weight_ptr, eps, HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    """RMSNorm of each head, a row of its two halves x1, x2 [heads, HALF_PAD], with weight [2 *
    HALF]: as RMSNorm._norm rounds, the normalized value to x's dtype, then the weight's product."""
    dims = tl.arange(0, HALF_PAD)
    dtype = x1.dtype
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    variance = (tl.sum(f1 * f1, axis=1) + tl.sum(f2 * f2, axis=1)) / (2 * HALF)
    inv_rms = tl.rsqrt(variance + eps)[:, None]
    w1 = tl.load(weight_ptr + dims, mask=dims < HALF, other=0.0).to(tl.float32)[None, :]
    w2 = tl.load(weight_ptr + HALF + dims, mask=dims < HALF, other=0.0).to(tl.float32)[None, :]
    n1 = (f1 * inv_rms).to(dtype).to(tl.float32)
    n2 = (f2 * inv_rms).to(dtype).to(tl.float32)
    return (w1 * n1).to(dtype), (w2 * n2).to(dtype)


@triton.jit
def _rotate_heads(
    x_ptr,
    stride_h,
    num_heads,
    cos,
    sin,
    norm_weight_ptr,
    eps,
    HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    NORM: tl.constexpr,  # each head RMSNormed (weight norm_weight_ptr) before its rotation
):
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, HALF_PAD)
    mask = (heads < num_heads)[:, None] & (dims < HALF)[None, :]
    ptrs = x_ptr + heads[:, None] * stride_h + dims[None, :]
    x1 = tl.load(ptrs, mask=mask, other=0.0)
    x2 = tl.load(ptrs + HALF, mask=mask, other=0.0)
    if NORM:
        x1, x2 = _norm_heads(x1, x2, norm_weight_ptr, eps, HALF, HALF_PAD)
    x1, x2 = _rotate_pair(x1, x2, cos, sin)
    tl.store(ptrs, x1, mask=mask)
    tl.store(ptrs + HALF, x2, mask=mask)


@triton.jit
def _load_cos_sin(
    positions_ptr, token, cos_ptr, sin_ptr, stride_cos, dtype, HALF: tl.constexpr, HALF_PAD: tl.constexpr
):
    """This token's cos/sin rows [1, HALF_PAD]: the fp32 table rounded to the model's dtype, as
    torch's `.to(q.dtype)` does, then widened again for the products."""
    position = tl.load(positions_ptr + token)
    dims = tl.arange(0, HALF_PAD)
    cos = tl.load(cos_ptr + position * stride_cos + dims, mask=dims < HALF, other=0.0).to(dtype)
    sin = tl.load(sin_ptr + position * stride_cos + dims, mask=dims < HALF, other=0.0).to(dtype)
    return cos.to(tl.float32)[None, :], sin.to(tl.float32)[None, :]


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    positions_ptr,
    cos_ptr,
    sin_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_cos,
    num_q_heads,
    num_k_heads,
    Q_HEADS_PAD: tl.constexpr,
    K_HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    cos, sin = _load_cos_sin(
        positions_ptr, token, cos_ptr, sin_ptr, stride_cos, q_ptr.dtype.element_ty, HALF, HALF_PAD
    )
    q, k = q_ptr + token * stride_qt, k_ptr + token * stride_kt
    _rotate_heads(q, stride_qh, num_q_heads, cos, sin, cos_ptr, 0.0, Q_HEADS_PAD, HALF, HALF_PAD, False)
    _rotate_heads(k, stride_kh, num_k_heads, cos, sin, cos_ptr, 0.0, K_HEADS_PAD, HALF, HALF_PAD, False)


def rotary_(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style RoPE of q [T, Hq, D] and k [T, Hkv, D] in place; cos/sin are [P, D/2] fp32."""
    tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride() != cos.stride():
        raise ValueError("rotary_ needs q, k, cos and sin contiguous in the head dimension")
    if tokens == 0:
        return q, k
    half = head_dim // 2
    _rotary_kernel[(tokens,)](
        q,
        k,
        positions,
        cos,
        sin,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos.stride(0),
        num_q_heads,
        num_k_heads,
        Q_HEADS_PAD=_next_power_of_2(num_q_heads),
        K_HEADS_PAD=_next_power_of_2(num_k_heads),
        HALF=half,
        HALF_PAD=_next_power_of_2(half),
        num_warps=4,
    )
    return q, k


@triton.jit
def _rotary_write_kv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    positions_ptr,
    cos_ptr,
    sin_ptr,
    k_cache_ptr,  # layer's K slice of block 0
    v_cache_ptr,  # layer's V slice of block 0
    slot_mapping_ptr,
    q_norm_ptr,  # QK_NORM: [D] weights of the per-head RMSNorm of q (else unused)
    k_norm_ptr,  # QK_NORM: of k
    eps,
    k_scale,
    v_scale,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cos,
    stride_block,
    stride_head,
    stride_token,
    num_q_heads,
    num_kv_heads,
    Q_HEADS_PAD: tl.constexpr,
    K_HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    QK_NORM: tl.constexpr,  # Qwen3: each q and k head RMSNormed before RoPE
    FP8: tl.constexpr,
    FP8_MAX: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_wait(PDL)
    token = tl.program_id(0).to(tl.int64)
    cos, sin = _load_cos_sin(
        positions_ptr, token, cos_ptr, sin_ptr, stride_cos, q_ptr.dtype.element_ty, HALF, HALF_PAD
    )
    _rotate_heads(
        q_ptr + token * stride_qt, stride_qh, num_q_heads, cos, sin, q_norm_ptr, eps,
        Q_HEADS_PAD, HALF, HALF_PAD, QK_NORM,
    )  # fmt: skip
    slot = tl.load(slot_mapping_ptr + token)
    if slot >= 0:
        heads = tl.arange(0, K_HEADS_PAD)
        dims = tl.arange(0, HALF_PAD)
        mask = (heads < num_kv_heads)[:, None] & (dims < HALF)[None, :]
        k_ptrs = k_ptr + token * stride_kt + heads[:, None] * stride_kh + dims[None, :]
        v_ptrs = v_ptr + token * stride_vt + heads[:, None] * stride_vh + dims[None, :]
        k1 = tl.load(k_ptrs, mask=mask, other=0.0)
        k2 = tl.load(k_ptrs + HALF, mask=mask, other=0.0)
        if QK_NORM:
            k1, k2 = _norm_heads(k1, k2, k_norm_ptr, eps, HALF, HALF_PAD)
        k1, k2 = _rotate_pair(k1, k2, cos, sin)
        v1 = tl.load(v_ptrs, mask=mask, other=0.0)
        v2 = tl.load(v_ptrs + HALF, mask=mask, other=0.0)
        if FP8:
            k1, k2 = fp8_scaled(k1, k_scale, FP8_MAX), fp8_scaled(k2, k_scale, FP8_MAX)
            v1, v2 = fp8_scaled(v1, v_scale, FP8_MAX), fp8_scaled(v2, v_scale, FP8_MAX)
        dest = (slot // BLOCK_SIZE).to(tl.int64) * stride_block + (slot % BLOCK_SIZE) * stride_token
        dest += heads[:, None] * stride_head + dims[None, :]
        dtype = k_cache_ptr.dtype.element_ty
        tl.store(k_cache_ptr + dest, k1.to(dtype), mask=mask)
        tl.store(k_cache_ptr + dest + HALF, k2.to(dtype), mask=mask)
        tl.store(v_cache_ptr + dest, v1.to(dtype), mask=mask)
        tl.store(v_cache_ptr + dest + HALF, v2.to(dtype), mask=mask)


def rotary_write_kv(
    positions: torch.Tensor,  # [T] int64
    q: torch.Tensor,  # [T, Hq, D], rotated in place
    k: torch.Tensor,  # [T, Hkv, D], left as it is: its rotated rows go to the cache
    v: torch.Tensor,  # [T, Hkv, D]
    cos: torch.Tensor,  # [P, D/2] fp32
    sin: torch.Tensor,
    kv_cache: torch.Tensor,  # [N, L, 2, Hkv, BS, D]
    layer: int,
    slot_mapping: torch.Tensor,  # [T] int64, -1 = keep nothing
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    q_norm_weight: torch.Tensor | None = None,  # [D]
    k_norm_weight: torch.Tensor | None = None,  # [D]
    eps: float = 0.0,
) -> None:
    """RoPE on q in place and on k into the cache, with v: rotary_ then write_kv in one launch.

    With `q_norm_weight` and `k_norm_weight` (Qwen3's q_norm and k_norm), each q and k head is
    first RMSNormed over its D values (`eps`) with the roundings of RMSNorm._norm: q holds the
    normalized, rotated heads, and the cache the normalized, rotated k."""
    tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    qk_norm = q_norm_weight is not None
    if qk_norm != (k_norm_weight is not None):
        raise ValueError(
            "rotary_write_kv normalizes q and k heads together: pass both norm weights or neither"
        )
    if qk_norm and any(w.shape != (head_dim,) or w.stride(0) != 1 for w in (q_norm_weight, k_norm_weight)):
        raise ValueError(
            f"q/k norm weights must be contiguous [{head_dim}] (the head dimension); "
            f"got {tuple(q_norm_weight.shape)} and {tuple(k_norm_weight.shape)}"
        )
    if any(t.stride(-1) != 1 for t in (q, k, v, cos, kv_cache)) or sin.stride() != cos.stride():
        raise ValueError(
            "rotary_write_kv needs q, k, v, cos, sin and the cache contiguous in the head dimension"
        )
    if (num_kv_heads, head_dim) != (kv_cache.shape[3], kv_cache.shape[5]) or v.shape != k.shape:
        raise ValueError(
            f"k/v rows are {tuple(k.shape[1:])}/{tuple(v.shape[1:])} but the cache holds "
            f"[{kv_cache.shape[3]}, {kv_cache.shape[5]}] per token"
        )
    if tokens == 0:
        return
    half = head_dim // 2
    _rotary_write_kv_kernel[(tokens,)](
        q,
        k,
        v,
        positions,
        cos,
        sin,
        kv_cache[:, layer, 0],
        kv_cache[:, layer, 1],
        slot_mapping,
        q_norm_weight if qk_norm else cos,
        k_norm_weight if qk_norm else cos,
        float(eps),
        float(k_scale),
        float(v_scale),
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        cos.stride(0),
        kv_cache.stride(0),
        kv_cache.stride(3),
        kv_cache.stride(4),
        num_q_heads,
        num_kv_heads,
        Q_HEADS_PAD=_next_power_of_2(num_q_heads),
        K_HEADS_PAD=_next_power_of_2(num_kv_heads),
        HALF=half,
        HALF_PAD=_next_power_of_2(half),
        BLOCK_SIZE=kv_cache.shape[4],
        QK_NORM=qk_norm,
        FP8=kv_cache.dtype in FP8_DTYPES,
        FP8_MAX=FP8_E4M3_MAX,
        num_warps=4,
        **_launch_options(q.device),
    )


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n_cols, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype)  # F.silu rounds here, then the product
    y = silu.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[:, :n]) * x[:, n:] for x [tokens, 2n]."""
    if x.dim() != 2 or x.stride(-1) != 1 or x.shape[1] % 2:
        raise ValueError(f"silu_and_mul takes [tokens, 2 * n] contiguous rows; got {tuple(x.shape)}")
    rows, n = x.shape[0], x.shape[1] // 2
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    if rows == 0:
        return out
    block = min(1024, _next_power_of_2(n))
    _silu_and_mul_kernel[(rows, triton.cdiv(n, block))](
        x, out, x.stride(0), out.stride(0), n, BLOCK=block, num_warps=4, **_launch_options(x.device)
    )
    return out


def _configs(tiles: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) tuples as autotuner configs."""
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=st) for n, k, w, st in tiles]


_MATMUL_CONFIGS = _configs(
    [(16, 256, 4, 4), (16, 512, 4, 3), (32, 256, 4, 4), (32, 128, 4, 6), (64, 128, 4, 4), (16, 128, 2, 6)]
)
# an fp8 weight row is half the bytes: twice the K per tile streams as many bytes a stage as
# the 16-bit tiles above (a first guess, not yet timed on a GPU)
_FP8_MATMUL_CONFIGS = _configs(
    [(16, 512, 4, 4), (16, 1024, 4, 3), (32, 512, 4, 4), (32, 256, 4, 6), (64, 256, 4, 4), (16, 256, 2, 6)]
)
# gate_up with SiLU-and-mul in the epilogue: each program streams two bands of BLOCK_N rows
# (gate and up), so the narrower bands, and shared-memory stages for both tiles
_GATE_UP_SILU_CONFIGS = _configs(
    [(16, 256, 4, 4), (16, 512, 4, 3), (32, 256, 4, 4), (32, 128, 4, 6), (16, 128, 4, 6)]
)
# More shapes for the cold-weight sweep (the decode-step benchmark's --gemv-sweep).
SWEEP_CONFIGS = [
    {"BLOCK_N": n, "BLOCK_K": k, "num_warps": w, "num_stages": st}
    for n, k, w, st in [
        (16, 256, 4, 4), (16, 512, 4, 3), (32, 256, 4, 4), (32, 128, 4, 6), (64, 128, 4, 4),
        (16, 128, 2, 6), (16, 1024, 8, 3), (32, 512, 8, 3), (16, 512, 8, 4), (64, 256, 8, 4),
        (16, 256, 8, 6), (16, 256, 4, 8), (32, 256, 8, 4), (16, 128, 4, 8),
    ]
]  # fmt: skip
# (N, K) -> config by device name, to pin tiles chosen by that sweep (every layer's own weight,
# so from HBM as a decode step reads them) instead of the autotuner's (one weight timed over and
# over, from L2 where it fits). Empty: on the H100 the sweep's tiles were faster alone (qkv
# 18.9 against 20.3 µs) but not in the whole step (5.87 against 5.82-5.84 ms; docs/benchmarks.md).
COLD_TUNED: dict[str, dict[tuple[int, int], dict]] = {}


def _cold_tuned_config(x: torch.Tensor, n: int, k: int) -> dict | None:
    table = COLD_TUNED.get(torch.cuda.get_device_name(x.device)) if x.is_cuda else None
    return table.get((n, k)) if table else None


@triton.jit
def _prefetch_l2(ptrs):
    tl.inline_asm_elementwise(
        "prefetch.global.L2 [$1]; // $0", "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1
    )


@triton.jit
def _small_m_matmul_kernel(
    x_ptr,
    w_ptr,
    w_up_ptr,  # GATE_UP_SILU: W's row N, where the up band starts (else unused)
    y_ptr,
    norm_w_ptr,
    scale_ptr,  # FP8_WEIGHT: fp32 [N] (gate | up: [2N]), each weight row's scale (else unused)
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    eps,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NORM: tl.constexpr,  # y = RMSNorm(x) W^T: x * norm weight into the dot, 1/rms after it
    SILU_MUL: tl.constexpr,  # x is [M, 2K] gate | up: y = (silu(gate) * up) W^T
    ADD_TO_Y: tl.constexpr,  # y += x W^T (the residual stream updated in place)
    GATE_UP_SILU: tl.constexpr,  # W is [2N, K] gate | up: y = silu(x gate^T) * (x up^T), [M, N]
    FP8_WEIGHT: tl.constexpr,  # W is float8_e4m3fn, row n worth W[n] * scale[n]
    PRECISION: tl.constexpr,  # tl.dot's input_precision: None (the default) or "ieee" for fp32 x
    PDL: tl.constexpr,
    PREFETCH_LINES: tl.constexpr,
):
    rows_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    if PREFETCH_LINES > 0:
        # the first lines of this program's weight rows into L2, before the wait: W is no
        # output of the previous kernel (a 128-byte line holds 64 16-bit or 128 fp8 values)
        lines = tl.minimum(tl.arange(0, PREFETCH_LINES) * (128 if FP8_WEIGHT else 64), K - 1)
        first = tl.minimum(rows_n, N - 1).to(tl.int64)[:, None] * stride_wn + lines[None, :]
        _prefetch_l2(w_ptr + first)
        if GATE_UP_SILU:
            _prefetch_l2(w_up_ptr + first)
    pdl_wait(PDL)
    rows_m = tl.arange(0, BLOCK_M)
    m_mask = rows_m < M
    n_mask = rows_n < N
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows_m[:, None] * stride_xm + ks[None, :]
    w_offsets = rows_n.to(tl.int64)[:, None] * stride_wn + ks[None, :]
    w_ptrs = w_ptr + w_offsets
    w_up_ptrs = w_up_ptr + w_offsets
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)  # GATE_UP_SILU only
    sum_sq = tl.zeros([BLOCK_M], tl.float32)
    for k in range(0, K, BLOCK_K):
        k_mask = (k + ks) < K
        x_mask = m_mask[:, None] & k_mask[None, :]
        x = tl.load(x_ptrs + k, mask=x_mask, other=0.0)
        if SILU_MUL:
            up = tl.load(x_ptrs + K + k, mask=x_mask, other=0.0)
            g = x.to(tl.float32)
            silu = (g / (1.0 + tl.exp(-g))).to(x.dtype)  # F.silu rounds here, then the product
            x = (silu.to(tl.float32) * up.to(tl.float32)).to(x.dtype)
        if NORM:
            xf = x.to(tl.float32)
            sum_sq += tl.sum(xf * xf, axis=1)
            norm_w = tl.load(norm_w_ptr + k + ks, mask=k_mask, other=0.0)
            x = (xf * norm_w.to(tl.float32)[None, :]).to(x.dtype)
        w_mask = n_mask[:, None] & k_mask[None, :]
        # an fp8 tile widens to x's dtype exactly (every e4m3 value is a bf16 and an fp16 value):
        # the read is a byte a weight, the dot the 16-bit one
        w = tl.load(w_ptrs + k, mask=w_mask, other=0.0).to(x.dtype)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
        if GATE_UP_SILU:  # the up band in the same loop, against the same x tile
            w_up = tl.load(w_up_ptrs + k, mask=w_mask, other=0.0).to(x.dtype)
            acc_up = tl.dot(x, tl.trans(w_up), acc_up, input_precision=PRECISION)
    if FP8_WEIGHT:
        # a row's scale factors out of its dot product: once on the fp32 sum, not on every tile
        acc = acc * tl.load(scale_ptr + rows_n, mask=n_mask, other=0.0)[None, :]
        if GATE_UP_SILU:
            acc_up = acc_up * tl.load(scale_ptr + N + rows_n, mask=n_mask, other=0.0)[None, :]
    if NORM:
        inv_rms = tl.rsqrt(sum_sq / K + eps)[:, None]
        acc = acc * inv_rms
        if GATE_UP_SILU:
            acc_up = acc_up * inv_rms
    y_ptrs = y_ptr + rows_m[:, None] * stride_ym + rows_n[None, :]
    y_mask = m_mask[:, None] & n_mask[None, :]
    y = acc.to(y_ptr.dtype.element_ty)
    if GATE_UP_SILU:
        # gate and up rounded to the model's dtype as the unfused matmul stores them, then
        # _silu_and_mul_kernel's arithmetic: silu rounded, the product in fp32, rounded
        up = acc_up.to(y.dtype)
        g = y.to(tl.float32)
        silu = (g / (1.0 + tl.exp(-g))).to(y.dtype)
        y = (silu.to(tl.float32) * up.to(tl.float32)).to(y.dtype)
    if ADD_TO_Y:
        # the projection rounded to the model's dtype, then the sum: as torch's matmul and add round
        y = (y.to(tl.float32) + tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)).to(y.dtype)
    tl.store(y_ptrs, y, mask=y_mask)


def _quick_bench(fn, quantiles):
    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


# tuned per (N, K, dtypes) and fusion on the first call, which a CUDA-graph runner makes while
# warming up, outside any capture
_tuned_kwargs = (
    {"do_bench": _quick_bench} if "do_bench" in inspect.signature(triton.autotune).parameters else {}
)
_small_m_matmul_tuned: dict[tuple[bool, bool, bool, bool, bool], object] = {}


def _tuned_kernel(norm: bool, silu_mul: bool, add_to_y: bool, gate_up_silu: bool, fp8: bool):
    variant = (norm, silu_mul, add_to_y, gate_up_silu, fp8)
    if variant not in _small_m_matmul_tuned:
        # a kernel that adds into y must find y as it was before each timed try
        restore = {"restore_value": ["y_ptr"]} if add_to_y else {}
        if gate_up_silu:
            configs = _GATE_UP_SILU_CONFIGS
        else:
            configs = _FP8_MATMUL_CONFIGS if fp8 else _MATMUL_CONFIGS
        _small_m_matmul_tuned[variant] = triton.autotune(configs, key=["N", "K"], **_tuned_kwargs, **restore)(
            _small_m_matmul_kernel
        )
    return _small_m_matmul_tuned[variant]


def small_m_matmul_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether small_m_matmul takes these: at most SMALL_M rows of x, contiguous rows, and
    either a 16-bit x and weight of one dtype, or a float8_e4m3fn weight (with its scales)
    and an x of bf16, fp16 or fp32 (fp32 multiplies in full fp32, "ieee", never tf32)."""
    if weight.dtype == FP8_WEIGHT_DTYPE:
        dtype_fits = x.dtype in (torch.bfloat16, torch.float16, torch.float32)
    else:
        dtype_fits = x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype
    return (
        x.dim() == 2
        and 0 < x.shape[0] <= SMALL_M
        and dtype_fits
        and x.stride(-1) == 1
        and weight.stride(-1) == 1
    )


def small_m_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    config: dict | None = None,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    silu_mul: bool = False,
    gate_up_silu: bool = False,
    out: torch.Tensor | None = None,
    weight_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M, K] @ weight[N, K]^T for M <= SMALL_M, with what comes just before or after it
    folded in:

    - `norm_weight`: RMSNorm(x) (weight `norm_weight`, `eps`) @ weight^T;
    - `silu_mul`: x is [M, 2K], gate | up, and the product is (silu(gate) * up) @ weight^T;
    - `gate_up_silu`: weight is the fused [2I, K] gate | up weight (gate rows first) and the
      result is silu(x gate^T) * (x up^T), [M, I]: the same bits as silu_and_mul of the
      plain product under the same tile config;
    - `out`: the product is added into `out` [M, N] in place (a residual stream) and returned;
    - `weight_scale`: weight is float8_e4m3fn and weight row n is worth weight[n] *
      weight_scale[n] (fp32 [N], or [2I] with gate_up_silu); y comes out in x's dtype.

    `config` (BLOCK_N, BLOCK_K, num_warps, num_stages) skips the tuning, as the interpreter
    on CPU needs."""
    k = weight.shape[1]
    in_k = 2 * k if silu_mul else k
    if not small_m_matmul_fits(x, weight) or x.shape[1] != in_k:
        raise ValueError(
            f"small_m_matmul takes x [M <= {SMALL_M}, {in_k}] and weight [N, {k}] of one 16-bit dtype, "
            f"or a float8_e4m3fn weight with x in bf16, fp16 or fp32; "
            f"got {tuple(x.shape)} {x.dtype} and {tuple(weight.shape)} {weight.dtype}"
        )
    m, n = x.shape[0], weight.shape[0]
    fp8 = weight.dtype == FP8_WEIGHT_DTYPE
    _check_weight_scale(weight, weight_scale)
    w_up = weight
    if gate_up_silu:
        if silu_mul or out is not None:
            raise ValueError(
                "gate_up_silu folds SiLU-and-mul after the matmul: pass neither silu_mul nor out"
            )
        if n % 2:
            raise ValueError(
                f"gate_up_silu takes the fused gate | up weight [2 * I, K], gate rows first; "
                f"got {tuple(weight.shape)}: an odd number of rows"
            )
        n //= 2
        w_up = weight[n:]
    if out is None:
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    elif out.shape != (m, n) or out.dtype != x.dtype or out.stride(-1) != 1:
        raise ValueError(
            f"out must be [{m}, {n}] {x.dtype} with contiguous rows; got {tuple(out.shape)} {out.dtype}"
        )
    else:
        y = out
    if norm_weight is not None and norm_weight.shape != (k,):
        raise ValueError(f"norm_weight must be [{k}]; got {tuple(norm_weight.shape)}")
    args = (
        x, weight, w_up, y, norm_weight if norm_weight is not None else weight,
        weight_scale if fp8 else weight, m, n, k, x.stride(0), weight.stride(0), y.stride(0), float(eps),
    )  # fmt: skip
    flags = {
        "NORM": norm_weight is not None,
        "SILU_MUL": silu_mul,
        "ADD_TO_Y": out is not None,
        "GATE_UP_SILU": gate_up_silu,
        "FP8_WEIGHT": fp8,
        # only an fp8 weight meets an fp32 x here (a 16-bit x keeps tl.dot's default)
        "PRECISION": "ieee" if x.dtype == torch.float32 else None,
    }
    flags.update(_launch_options(x.device))
    flags["PREFETCH_LINES"] = PREFETCH_LINES if flags["PDL"] else 0
    if config is None and not gate_up_silu and not fp8:  # the cold table holds the 16-bit plain tiles
        config = _cold_tuned_config(x, n, k)
    if config is not None:
        meta = dict(config)
        grid = (triton.cdiv(n, meta["BLOCK_N"]),)
        _small_m_matmul_kernel[grid](*args, BLOCK_M=SMALL_M, **flags, **meta)
    else:
        kernel = _tuned_kernel(flags["NORM"], silu_mul, flags["ADD_TO_Y"], gate_up_silu, fp8)
        kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](*args, BLOCK_M=SMALL_M, **flags)
    return y


def _check_weight_scale(weight: torch.Tensor, weight_scale: torch.Tensor | None) -> None:
    """An fp8 weight comes with its fp32 row scales [N], a 16-bit one with none."""
    fp8 = weight.dtype == FP8_WEIGHT_DTYPE
    if fp8 != (weight_scale is not None):
        raise ValueError(
            "a float8_e4m3fn weight needs weight_scale (fp32 [N], one a row) and only such a weight "
            f"takes one; got a {weight.dtype} weight with{'out' if weight_scale is None else ''} weight_scale"
        )
    if fp8 and (
        tuple(weight_scale.shape) != (weight.shape[0],)
        or weight_scale.dtype != torch.float32
        or weight_scale.stride(0) != 1
        or weight_scale.device != weight.device
    ):
        raise ValueError(
            f"weight_scale must be a contiguous fp32 [{weight.shape[0]}] on {weight.device}, one scale a "
            f"weight row; got {tuple(weight_scale.shape)} {weight_scale.dtype} on {weight_scale.device} "
            "(block-wise scales are not served here: dequantize such a weight)"
        )
