"""Triton kernels for the decoder's layers on CUDA: one launch where eager torch makes many,
and a matmul for the few rows of a small decode batch.

A decode step at batch 1 is a chain of small launches between the weight reads; in eager
torch RMSNorm is 8 kernels, the residual add 1 more, RoPE on q and k 18 and SiLU-and-mul 2,
and inside a CUDA graph each still costs a couple of microseconds. Here each is one
kernel: RMSNorm with the residual add folded in, RoPE on q and k in place, SiLU-and-mul.

small_m_matmul serves x [M <= 16, K] @ W[N, K]^T, where the step only streams W: every
program reads a band of W's rows through a pipelined loop (tile shapes tuned on the device
per weight shape), with x padded to the 16 rows tl.dot needs.

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

SMALL_M = 16  # rows of x one small_m_matmul program holds (tl.dot needs at least 16)


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
):
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
    )
    return out


@triton.jit
def _rotate_heads(
    x_ptr, stride_h, num_heads, cos, sin, HEADS_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr
):
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, HALF_PAD)
    mask = (heads < num_heads)[:, None] & (dims < HALF)[None, :]
    ptrs = x_ptr + heads[:, None] * stride_h + dims[None, :]
    x1 = tl.load(ptrs, mask=mask, other=0.0)
    x2 = tl.load(ptrs + HALF, mask=mask, other=0.0)
    dtype = x1.dtype
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    # torch computes each product in the model's dtype, then the sum: round where it rounds
    a = (x1 * cos).to(dtype).to(tl.float32)
    b = (x2 * sin).to(dtype).to(tl.float32)
    c = (x2 * cos).to(dtype).to(tl.float32)
    d = (x1 * sin).to(dtype).to(tl.float32)
    tl.store(ptrs, (a - b).to(dtype), mask=mask)
    tl.store(ptrs + HALF, (c + d).to(dtype), mask=mask)


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
    position = tl.load(positions_ptr + token)
    dims = tl.arange(0, HALF_PAD)
    # the fp32 table rounded to the model's dtype, as torch's `.to(q.dtype)` does
    dtype = q_ptr.dtype.element_ty
    cos = tl.load(cos_ptr + position * stride_cos + dims, mask=dims < HALF, other=0.0).to(dtype)
    sin = tl.load(sin_ptr + position * stride_cos + dims, mask=dims < HALF, other=0.0).to(dtype)
    cos = cos.to(tl.float32)[None, :]
    sin = sin.to(tl.float32)[None, :]
    _rotate_heads(q_ptr + token * stride_qt, stride_qh, num_q_heads, cos, sin, Q_HEADS_PAD, HALF, HALF_PAD)
    _rotate_heads(k_ptr + token * stride_kt, stride_kh, num_k_heads, cos, sin, K_HEADS_PAD, HALF, HALF_PAD)


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
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n_cols, BLOCK: tl.constexpr):
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
        x, out, x.stride(0), out.stride(0), n, BLOCK=block, num_warps=4
    )
    return out


_MATMUL_CONFIGS = [
    triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=st)
    for n, k, w, st in [
        (16, 256, 4, 4),
        (16, 512, 4, 3),
        (32, 256, 4, 4),
        (32, 128, 4, 6),
        (64, 128, 4, 4),
        (16, 128, 2, 6),
    ]
]


@triton.jit
def _small_m_matmul_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_m = tl.arange(0, BLOCK_M)
    m_mask = rows_m < M
    n_mask = rows_n < N
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows_m[:, None] * stride_xm + ks[None, :]
    w_ptrs = w_ptr + rows_n.to(tl.int64)[:, None] * stride_wn + ks[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k in range(0, K, BLOCK_K):
        k_mask = (k + ks) < K
        x = tl.load(x_ptrs + k, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs + k, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    y_ptrs = y_ptr + rows_m[:, None] * stride_ym + rows_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _quick_bench(fn, quantiles):
    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


# tuned per (N, K, dtypes) on the first call, which a CUDA-graph runner makes while warming
# up, outside any capture
_tuned_kwargs = (
    {"do_bench": _quick_bench} if "do_bench" in inspect.signature(triton.autotune).parameters else {}
)
_small_m_matmul_tuned = triton.autotune(_MATMUL_CONFIGS, key=["N", "K"], **_tuned_kwargs)(
    _small_m_matmul_kernel
)


def small_m_matmul_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether small_m_matmul takes these: a 16-bit x of at most SMALL_M rows, contiguous rows."""
    return (
        x.dim() == 2
        and 0 < x.shape[0] <= SMALL_M
        and x.dtype in (torch.bfloat16, torch.float16)
        and weight.dtype == x.dtype
        and x.stride(-1) == 1
        and weight.stride(-1) == 1
    )


def small_m_matmul(x: torch.Tensor, weight: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """x [M, K] @ weight[N, K]^T for M <= SMALL_M; `config` (BLOCK_N, BLOCK_K, num_warps,
    num_stages) skips the tuning, as the interpreter on CPU needs."""
    if not small_m_matmul_fits(x, weight) or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"small_m_matmul takes x [M <= {SMALL_M}, K] and weight [N, K] of one 16-bit dtype; "
            f"got {tuple(x.shape)} {x.dtype} and {tuple(weight.shape)} {weight.dtype}"
        )
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    args = (x, weight, y, m, n, k, x.stride(0), weight.stride(0), y.stride(0))
    if config is not None:
        meta = dict(config)
        grid = (triton.cdiv(n, meta["BLOCK_N"]),)
        _small_m_matmul_kernel[grid](*args, BLOCK_M=SMALL_M, **meta)
    else:
        _small_m_matmul_tuned[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](*args, BLOCK_M=SMALL_M)
    return y
