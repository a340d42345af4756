"""GGUF's 4- and 8-bit blocks kept quantized on the CPU (`--quantization gguf`).

A GGUF file of a small model is mostly Q4_0/Q4_1 weights: 32 weights a block, one fp16
scale (and for Q4_1 one fp16 minimum) a block. Dequantized to fp32 they are 6.4× the bytes,
and a decode step on a 2-core CPU is bound by reading them. torch's CPU kernel for int4
weights (`_weight_int4pack_mm_for_cpu`: groups of 32 along K, w = (q - 8) · scale + zero,
bf16 activations) takes these blocks as they are:

- Q4_0: w = d · (q - 8)          → scale d, zero 0
- Q4_1: w = d · q + m            → scale d, zero m + 8d
- Q8_0: w = d · q, q in [-128, 127] → two int4 parts, q = 16 · hi + lo with hi in [-8, 7] and
  lo in [0, 15]: (hi + 8, scale 16d, zero 0) plus (lo, scale d, zero 8d). Two matmuls, the
  same bytes as int8; used for a tied LM head stored as Q8_0.

The kernel holds scales and zeros in the activations' dtype (bf16), so d and m lose the
last bits of their fp16 mantissa, and the activations are rounded to bf16: the results are
near the fp32 path's, not equal (docs/quantization.md states the measured tolerance).
Other block types are dequantized to --dtype as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType

GROUP = 32  # weights a GGUF block holds, and the kernel's group along K
PACKABLE_TYPES = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0)


@dataclass
class Int4Part:
    """One int4 operand: values 0..15 [N, K] uint8, scale and zero [N, K / 32] fp32."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        n, k = self.q.shape
        grouped = (self.q.float() - 8).view(n, k // GROUP, GROUP)
        return (grouped * self.scale[:, :, None] + self.zero[:, :, None]).view(n, k)


def int4_parts(raw: np.ndarray, qtype: GGMLQuantizationType) -> list[Int4Part]:
    """The int4 parts whose sum is a GGUF tensor's weight, from its raw rows [N, bytes a row]."""
    rows = raw.shape[0]
    if qtype == GGMLQuantizationType.Q8_0:
        blocks = raw.reshape(rows, -1, 34)
        d = _fp16(blocks[:, :, :2])
        q = (
            torch.from_numpy(np.ascontiguousarray(blocks[:, :, 2:]).view(np.int8))
            .reshape(rows, -1)
            .to(torch.int16)
        )
        hi, lo = (q >> 4) + 8, q & 15
        return [
            Int4Part(hi.to(torch.uint8), d * 16, torch.zeros_like(d)),
            Int4Part(lo.to(torch.uint8), d, d * 8),
        ]
    if qtype == GGMLQuantizationType.Q4_1:
        blocks = raw.reshape(rows, -1, 20)
        d, m, packed = _fp16(blocks[:, :, :2]), _fp16(blocks[:, :, 2:4]), blocks[:, :, 4:]
        return [Int4Part(_nibbles(packed, rows), d, m + 8 * d)]
    if qtype == GGMLQuantizationType.Q4_0:
        blocks = raw.reshape(rows, -1, 18)
        d, packed = _fp16(blocks[:, :, :2]), blocks[:, :, 2:]
        return [Int4Part(_nibbles(packed, rows), d, torch.zeros_like(d))]
    raise ValueError(f"GGUF block type {qtype.name} is not kept quantized; it is dequantized instead")


def _fp16(two_bytes: np.ndarray) -> torch.Tensor:
    """[N, blocks, 2] bytes → [N, blocks] fp32 of the fp16 they hold."""
    return torch.from_numpy(np.ascontiguousarray(two_bytes).view(np.float16)[..., 0].astype(np.float32))


def _nibbles(packed: np.ndarray, rows: int) -> torch.Tensor:
    """A block's 16 bytes hold weights 0..15 in their low nibbles and 16..31 in their high ones."""
    # numpy, one thread: torch's threads only fight a busy worker's other threads here
    return torch.from_numpy(np.concatenate((packed & 15, packed >> 4), axis=-1).reshape(rows, -1))


def concat_rows(parts_per_tensor: list[list[Int4Part]]) -> list[Int4Part]:
    """Fuse tensors of one block type along the output dimension (q, k, v into qkv)."""
    counts = {len(parts) for parts in parts_per_tensor}
    if len(counts) != 1:
        raise ValueError("fused tensors of different GGUF block types are not kept quantized together")
    return [
        Int4Part(
            *(torch.cat([getattr(parts[i], f) for parts in parts_per_tensor]) for f in ("q", "scale", "zero"))
        )
        for i in range(counts.pop())
    ]


class PackedInt4Weight:
    """A linear layer's weight as torch's packed int4 operands; `matmul(x)` is x Wᵀ."""

    def __init__(self, parts: list[Int4Part], compute_dtype: torch.dtype = torch.bfloat16) -> None:
        self.out_features, self.in_features = parts[0].q.shape
        if self.in_features % GROUP:
            raise ValueError(f"in_features {self.in_features} is not a multiple of {GROUP}")
        self.compute_dtype = compute_dtype
        self._operands = [
            (
                torch.ops.aten._convert_weight_to_int4pack_for_cpu(p.q.to(torch.int32), 1),
                torch.stack((p.scale.t(), p.zero.t()), dim=-1).to(compute_dtype).contiguous(),
            )
            for p in parts
        ]

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1]).to(self.compute_dtype)
        y = None
        for packed, scales_and_zeros in self._operands:
            part = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, packed, GROUP, scales_and_zeros)
            y = part if y is None else y.add_(part)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() + s.numel() * s.element_size() for p, s in self._operands)
