"""Building blocks of the Llama-family decoder: linear layers, RMSNorm, rotary embedding.

Op order follows Hugging Face transformers where it changes the rounding (RMSNorm in
fp32, RoPE cos/sin computed in fp32 then cast), so fp32 outputs match it closely.

On CUDA, RMSNorm (with the residual add), RoPE and SiLU-and-mul run as one Triton kernel
each (common/models/triton_layers.py) instead of a chain of small torch launches, and the
matmuls of a batch of at most 16 rows (decode) run the Triton small-M matmul, which streams
the smaller weights faster than cuBLAS does at M = 1 (docs/benchmarks.md, "Whole-model
decode step"); for such a batch SiLU-and-mul runs in the gate_up matmul's epilogue.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# False runs the plain torch ops on CUDA too (the decode-step benchmark times both).
USE_TRITON_KERNELS = True
# False keeps cuBLAS for the matmuls of small batches too (the decode-step benchmark times both).
USE_TRITON_SMALL_MATMUL = True
# True runs a batch of at most 16 rows (a decode step) through DecoderLayer.forward_small_batch:
# the residual adds folded into the o/down projections, and, per the two switches below, the
# RMSNorms into the matmul after them and SiLU-and-mul into the down projection's operand.
# The decode-step benchmark times each combination against the layer-by-layer path.
USE_FUSED_SMALL_BATCH = False
FUSE_NORM_INTO_MATMUL = True
FUSE_SILU_INTO_MATMUL = True
# True applies SiLU-and-mul in the epilogue of a small batch's gate_up matmul (the Triton
# small-M matmul streams the gate and up rows of each band together), one launch fewer per
# layer; it takes precedence over FUSE_SILU_INTO_MATMUL in forward_small_batch. Off: on the
# H100 the two-band stream made the batch-1 step slower (5.97 against 5.86 ms, docs/benchmarks.md).
FUSE_SILU_INTO_GATE_UP = False
# True lets a pure-decode step's attention backend apply RoPE and write the new token's K/V
# inside its decode kernel (TritonAttentionBackend.decode_with_new_token) instead of a
# rotary_write_kv launch of its own. False: the separate launch (the benchmark times both).
FUSE_ROPE_INTO_DECODE = True
# True lets Qwen3 (per-head q/k RMSNorm, folded into rotary_write_kv) and mixture-of-experts
# models (Qwen3-MoE, Mixtral; with moe.USE_SMALL_BATCH_MOE, their experts through
# fused_moe_small_batch) take DecoderLayer.forward_small_batch, whatever USE_FUSED_SMALL_BATCH
# says (that switch stays the dense Llama's choice). On an H100, Qwen3-30B-A3B bf16, context
# 1024, a graphed decode step at batch 1 took 5.00 ms on it against 6.10 ms layer by layer (both
# with the small-batch experts), and 17.45 against 18.57 ms at batch 16 (docs/benchmarks.md).
FUSE_SMALL_BATCH_QWEN3 = True


def _cuda_kernels(x: torch.Tensor):
    """The Triton layer kernels when x is on a CUDA device and triton imports, else None."""
    if not (x.is_cuda and USE_TRITON_KERNELS):
        return None
    return triton_module("common.models.triton_layers")


@functools.cache
def triton_module(name: str) -> Any:
    """The module `name` of Triton kernels, imported once; None where triton does not import
    (any other import error is a bug and raised)."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        if exc.name is None or exc.name.split(".")[0] != "triton":
            raise
        return None


def cuda_layer_kernels(x: torch.Tensor):
    """common.models.triton_layers when x is on a CUDA device and the Triton layers are on, else None."""
    return _cuda_kernels(x)


def small_batch_kernels(x: torch.Tensor, qwen3_or_experts: bool = False):
    """The Triton layer kernels when x [tokens, hidden] is a batch the fused small-batch path
    serves (CUDA, 16-bit, at most 16 rows: a decode step), else None. `qwen3_or_experts`: the
    model has q/k norms or experts, whose fused path FUSE_SMALL_BATCH_QWEN3 turns on."""
    fused = USE_FUSED_SMALL_BATCH or (qwen3_or_experts and FUSE_SMALL_BATCH_QWEN3)
    if not (fused and USE_TRITON_SMALL_MATMUL):
        return None
    kernels = _cuda_kernels(x)
    if kernels is None or not kernels.small_m_matmul_fits(x, x):
        return None
    return kernels


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T (+ b); a decode batch of a few rows on CUDA goes to the Triton small-M matmul."""
    if bias is None and USE_TRITON_SMALL_MATMUL:
        kernels = _cuda_kernels(x)
        if kernels is not None and kernels.small_m_matmul_fits(x, weight):
            return kernels.small_m_matmul(x, weight)
    return F.linear(x, weight, bias)


class Linear(nn.Module):
    """y = x W^T (+ b). Parameters start uninitialized: a loader always fills them.

    `lora` (common/lora/lora_layer.py, set by an engine with --enable-lora) adds the
    step's adapters' products to y; None serves the base model alone. `packed` (a weight
    object with `matmul(x)`: common.models.gguf_int4.PackedInt4Weight with --quantization
    gguf, common.models.fp8_weights.Fp8Weight with fp8) replaces the weight, which then keeps
    only its shape (see `keep_packed`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.lora = None
        self.packed = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            y = linear(x, self.weight, self.bias)
        else:
            y = self.packed.matmul(x)
            if self.bias is not None:
                y = y + self.bias
        return y if self.lora is None else self.lora(x, y)

    def keep_packed(self, packed) -> None:
        """Serve from `packed` and free the dense weight: what stays is a zero-strided
        tensor of the same shape, dtype and device, for code that reads those."""
        self.packed = packed
        w = self.weight
        self.weight = nn.Parameter(w.new_zeros(()).expand(w.shape), requires_grad=False)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernels = _cuda_kernels(x)
        if kernels is not None and x.dim() == 2 and x.stride(-1) == 1:
            return kernels.rms_norm(x, self.weight, self.eps)
        return self._norm(x)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual). On CUDA the sum is written into `residual`."""
        kernels = _cuda_kernels(x)
        if kernels is not None and x.dim() == 2 and x.stride(-1) == 1 and residual.is_contiguous():
            return kernels.rms_norm(x, self.weight, self.eps, residual), residual
        residual = x + residual
        return self._norm(residual), residual

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        variance = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in fp32 on CPU, with the configured scaling."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "freq_factors":
        return inv_freq / torch.tensor(scaling["factors"], dtype=torch.float32)
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    return inv_freq


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    # Llama 3.1: long wavelengths are slowed down by `factor`, short ones kept, and the
    # band between them interpolated smoothly.
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Neox-style RoPE (rotate halves) from a cos/sin table computed once for every position."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any] | None):
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        freqs = torch.arange(max_positions, device="cpu").float()[:, None] * inv_freq[None, :]
        device = torch.get_default_device()
        self.register_buffer("cos", freqs.cos().to(device), persistent=False)  # [P, D/2] fp32
        self.register_buffer("sin", freqs.sin().to(device), persistent=False)
        self._step_tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, Hq, D], k [T, Hkv, D] rotated by their token's position (in place on CUDA)."""
        kernels = _cuda_kernels(q)
        if kernels is not None:
            return kernels.rotary_(positions, q, k, self.cos, self.sin)
        step = self._step_tables
        if step is not None and step[0] is positions and step[1].dtype == q.dtype:
            cos, sin = step[1], step[2]
        else:
            cos, sin = self._tables(positions, q.dtype)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)

    def _tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions].to(dtype).unsqueeze(1), self.sin[positions].to(dtype).unsqueeze(1)

    @contextlib.contextmanager
    def step_tables(self, positions: torch.Tensor, dtype: torch.dtype) -> Iterator[None]:
        """Inside, every layer's forward with this `positions` reuses one gather of its cos
        and sin rows instead of indexing the tables again (the CPU path; the same values)."""
        if positions.is_cuda:
            yield
            return
        self._step_tables = (positions, *self._tables(positions, dtype))
        try:
            yield
        finally:
            self._step_tables = None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Same products and sums as x * cat(cos, cos) + rotate_half(x) * cat(sin, sin).
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), with gate and up fused in one matmul."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size)
        self.down_proj = Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernels = _cuda_kernels(x)
        if kernels is not None and self._silu_in_gate_up(kernels, x):
            return self.down_proj(kernels.small_m_matmul(x, self.gate_up_proj.weight, gate_up_silu=True))
        gate_up = self.gate_up_proj(x)
        if kernels is not None and gate_up.dim() == 2:
            return self.down_proj(kernels.silu_and_mul(gate_up))
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)

    def _silu_in_gate_up(self, kernels, x: torch.Tensor) -> bool:
        """Whether the gate_up matmul of x can apply SiLU-and-mul in its epilogue: the
        switches on, a plain bias-free Linear, and a batch the small-M matmul takes. A
        tensor-parallel rank's gate_up weight is [its gate rows; its up rows] as well
        (LlamaForCausalLM.weight_targets), so ranks take it too."""
        gate_up = self.gate_up_proj
        return (
            FUSE_SILU_INTO_GATE_UP
            and USE_TRITON_SMALL_MATMUL
            and type(gate_up) is Linear
            and gate_up.bias is None
            and gate_up.lora is None
            and gate_up.packed is None
            and kernels.small_m_matmul_fits(x, gate_up.weight)
        )
