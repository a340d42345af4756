"""A linear layer's weight in fp8 (`--quantization fp8`): float8_e4m3fn values and fp32 scales.

The value of weight element (n, k) is `q[n, k] · scale`, where the scale is one of
- per row: `scale[n]`, fp32 [N]. A per-tensor scale is held this way too (one value
  repeated): fused q/k/v or gate/up parts keep their own scales exactly, where vLLM
  requantizes them to the largest one, because the row-wise GEMM below takes per-row scales
  at no extra cost;
- per block: `scale[n // bn, k // bk]`, fp32 [ceil(N / bn), ceil(K / bk)] (DeepSeek's
  `weight_scale_inv` with `weight_block_size` [bn, bk]).

`matmul(x)` is x Wᵀ. On a CUDA device of compute capability 8.9 or more (Ada, Hopper) a
per-row weight goes through `torch._scaled_mm` with row-wise scaling: x is quantized to fp8
per token (its scale [M, 1] = amax(|x_m|) / 448) or with a checkpoint's static input scale,
and the weight's scales are a [1, N] fp32 row; the product comes out in bf16. Elsewhere (the
CPU, a block-wise weight, a shape _scaled_mm refuses) the weight is dequantized once, at
construction, to the compute dtype and multiplied densely: the CPU has no fp8 GEMM, and
converting every fp8 weight to the compute dtype on every call would read and write more
bytes than the dense matmul itself does, so the CPU path serves correctness (the layouts,
the loader) at dense speed, not fp8 speed. The fp8 values are kept beside it (a quarter of
an fp32 weight) so the stored form stays inspectable.

With `USE_TRITON_FP8_SMALL_M` on (the default), a product of at most 16 rows (a decode step)
that _scaled_mm would serve goes instead to the Triton small-M matmul's fp8 path
(common/models/triton_layers.py `small_m_matmul` with `weight_scale`): weight-only, the fp8
tiles widened to bf16 in the kernel and the row scales applied to the fp32 sums, x left in
its dtype. At that size the step is bound by reading the weights, and quantizing x costs
launches of its own (amax, scale, convert) that the Triton path does not make. On an H100
(Llama-3-8B shapes, context 1024, docs/benchmarks.md) the graphed batch-1 decode step took
4.25 ms this way against 7.10 ms through _scaled_mm (its weight-read floor: 2.71 ms). The
Triton path ignores a static input scale (a checkpoint's `input_scale`): x is never quantized
there, so it differs from _scaled_mm by the activations' fp8 rounding only. Under
layers.USE_FUSED_SMALL_BATCH a Llama-family model whose every packed weight is such an fp8
weight also keeps the fused small-batch layer (`small_m_operands`); that was slower on the
H100 (9.86 ms at batch 1), so it stays that switch's choice (off).
"""

from __future__ import annotations

import torch

from common.models.layers import cuda_layer_kernels, linear

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite float8_e4m3fn
# a zero row or token gets this amax instead of 0, so its scale divides safely and its values stay 0
_MIN_AMAX = 1e-12
_SCALED_MM_ALIGN = 16  # _scaled_mm needs K and N divisible by 16
# True sends a product of at most 16 rows that _scaled_mm would serve to the Triton small-M
# matmul's fp8 path instead (see above); the decode-step benchmark times both (--fp8-small-m).
# layers.USE_TRITON_KERNELS off turns it off too; USE_TRITON_SMALL_MATMUL, the 16-bit weights'
# switch, does not.
USE_TRITON_FP8_SMALL_M = True


class Fp8Weight:
    """fp8 values [N, K], scales per row [N] or per block, an optional static input scale."""

    def __init__(
        self,
        weight: torch.Tensor,
        scale: torch.Tensor,
        block: tuple[int, int] | None = None,
        input_scale: torch.Tensor | None = None,
        compute_dtype: torch.dtype = torch.bfloat16,
        prepare: bool = True,
    ) -> None:
        """`prepare` False skips building the matmul's operands: a part about to be fused."""
        if weight.dtype != FP8 or weight.dim() != 2:
            raise ValueError(
                f"an fp8 weight is a 2-D float8_e4m3fn tensor, not {weight.dtype} {tuple(weight.shape)}"
            )
        self.out_features, self.in_features = weight.shape
        expected = (self.out_features,) if block is None else _block_grid(weight.shape, block)
        if tuple(scale.shape) != expected:
            raise ValueError(
                f"fp8 weight {tuple(weight.shape)} needs scales {expected}, got {tuple(scale.shape)}"
            )
        self.weight = weight.contiguous()
        self.scale = scale.float().contiguous()
        self.block = block
        self.input_scale = None if input_scale is None else input_scale.float().reshape(1, 1)
        self.compute_dtype = compute_dtype
        # the GEMM's operand: the scales as one fp32 row [1, N]
        self._scale_row = self._dense = None
        if prepare and self._scaled_mm_serves():
            self._scale_row = self.scale.view(1, -1)
        elif prepare:
            self._dense = self.dequantize(compute_dtype)

    @classmethod
    def quantize(cls, w: torch.Tensor, compute_dtype: torch.dtype | None = None) -> Fp8Weight:
        """Dynamic quantization at load: per-output-channel scales amax(|w_n|) / 448."""
        q, scale = quantize_rows(w)
        return cls(q, scale, compute_dtype=compute_dtype or w.dtype)

    @classmethod
    def fuse_rows(
        cls, parts: list[Fp8Weight], compute_dtype: torch.dtype | None = None, prepare: bool = True
    ) -> Fp8Weight:
        """Tensors stacked along the output dimension (q, k, v into qkv; gate, up into gate_up).

        Per-row scales concatenate; block-wise parts must each end on a block boundary.
        Static input scales become their largest (vLLM's rule): one activation scale serves
        the fused matmul, and the largest clips none of the parts' inputs."""
        blocks = {p.block for p in parts}
        if len(blocks) != 1:
            raise ValueError("fused fp8 tensors mix per-row and block-wise scales; requantize the checkpoint")
        block = blocks.pop()
        if block is not None and any(p.out_features % block[0] for p in parts[:-1]):
            raise ValueError(f"fused fp8 tensors do not end on {block[0]}-row scale blocks")
        statics = [p.input_scale for p in parts]
        if any(s is None for s in statics) and any(s is not None for s in statics):
            raise ValueError("fused fp8 tensors mix static and dynamic activation scales")
        return cls(
            torch.cat([p.weight for p in parts]),
            torch.cat([p.scale for p in parts]),
            block,
            None if statics[0] is None else torch.stack(statics).max(),
            compute_dtype or parts[0].compute_dtype,
            prepare,
        )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight's values [N, K]: fp8 times its scale, computed in fp32."""
        if self.block is None:
            scale = self.scale[:, None]
        else:
            bn, bk = self.block
            scale = self.scale.repeat_interleave(bn, 0)[: self.out_features]
            scale = scale.repeat_interleave(bk, 1)[:, : self.in_features]
        return (self.weight.float() * scale).to(dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        if self._dense is not None:
            y = linear(rows.to(self._dense.dtype), self._dense)
        elif (kernels := self.small_m_kernels(rows)) is not None:
            y = kernels.small_m_matmul(rows, self.weight, weight_scale=self.scale)
        else:
            y = self._scaled_matmul(rows)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def small_m_kernels(self, rows: torch.Tensor):
        """The Triton layer kernels when their fp8 small-M matmul serves x = rows [M, K]: the
        switch on, a weight _scaled_mm would serve (CUDA, compute capability 8.9 or more,
        per-row scales; elsewhere the dense copy serves), M <= 16 and a layout the kernel
        takes. Else None."""
        if not USE_TRITON_FP8_SMALL_M or self._scale_row is None:
            return None
        kernels = cuda_layer_kernels(rows)
        if kernels is None or not kernels.small_m_matmul_fits(rows, self.weight):
            return None
        return kernels

    def small_m_operands(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(fp8 values [N, K], fp32 row scales [N]) for the fused small-batch decoder layer
        (common/models/llama.py `forward_small_batch`), which feeds them to the Triton small-M
        matmul beside its norm, SiLU and residual fusions: when the switch is on and this is a
        weight _scaled_mm would serve. Else None, and the layer keeps the general path."""
        if not USE_TRITON_FP8_SMALL_M or self._scale_row is None:
            return None
        return self.weight, self.scale

    def _scaled_matmul(self, rows: torch.Tensor) -> torch.Tensor:
        x = rows.float()
        if self.input_scale is not None:  # a checkpoint's static activation scale
            x_scale = self.input_scale.expand(x.shape[0], 1).contiguous()
        else:  # per token, as vLLM's dynamic per-token scheme
            x_scale = x.abs().amax(dim=1, keepdim=True).clamp_(min=_MIN_AMAX) / FP8_MAX
        xq = (x / x_scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
        # mat2 must be column-major: the [N, K] row-major weight, transposed, is exactly that.
        # Row-wise scaling (scale_a [M, 1], scale_b [1, N]) gives bf16 out.
        return torch._scaled_mm(
            xq, self.weight.t(), scale_a=x_scale, scale_b=self._scale_row, out_dtype=torch.bfloat16
        )

    def _scaled_mm_serves(self) -> bool:
        return (
            self.weight.is_cuda
            and self.block is None
            and torch.cuda.get_device_capability(self.weight.device) >= (8, 9)
            and self.in_features % _SCALED_MM_ALIGN == 0
            and self.out_features % _SCALED_MM_ALIGN == 0
        )

    def nbytes(self) -> int:
        return self.weight.numel() + self.scale.numel() * 4


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 values, fp32 scales) of w [..., N, K] with one scale per row, amax(|w_n|) / 448:
    a linear layer's output channels, or each expert's of a stacked [E, N, K]."""
    w32 = w.float()
    scale = w32.abs().amax(dim=-1).clamp(min=_MIN_AMAX) / FP8_MAX
    return (w32 / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def _block_grid(shape: torch.Size, block: tuple[int, int]) -> tuple[int, int]:
    (n, k), (bn, bk) = shape, block
    return (-(-n // bn), -(-k // bk))
