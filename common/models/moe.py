"""The sparse mixture-of-experts MLP of Qwen3-MoE and Mixtral, and where its weights come from.

A router (a bias-free matmul) scores every expert for each token; the token's top-k
experts, SiLU-gated MLPs, each run on it and their outputs are summed with the routing
weights (common/models/fused_moe_reference.py). Each layer's experts are held stacked,
`w13 [E, 2I, H]` (gate rows, then up rows) and `w2 [E, H, I]`: the checkpoint's
per-expert tensors load straight into slices of them (weight_targets), so stacking costs
no second copy.

Under tensor parallelism each rank holds every expert's slice of the intermediate columns
(vLLM's split): its experts' outputs are partial sums, all-reduced once per layer.

On a CUDA device the experts run in the Triton kernels of common/models/fused_moe_triton.py,
which never read anything back to the host, so a decode step with MoE layers is captured in
a CUDA graph like a dense one; elsewhere (the CPU) the torch reference runs, which reads each
expert's token count back. With --quantization fp8 (quantize_fp8) the kernels read the
experts in fp8 with a scale per (expert, output row); where the reference runs they are
dequantized to the model's dtype once, at load, as dense fp8 layers are on the CPU.
"""

from __future__ import annotations

import torch
from torch import nn

from common.models.config import ModelConfig
from common.models.fp8_weights import FP8, quantize_rows
from common.models.fused_moe_reference import fused_moe, select_experts
from common.models.layers import linear, triton_module

USE_TRITON_MOE = True  # False: the torch reference on CUDA too (eager only: it syncs)
# True: batches of at most SMALL_BATCH_MAX_TOKENS tokens take fused_moe_small_batch (routing,
# gate/up, down with the sum over k: three launches after the router). On an H100, Qwen3-30B-A3B
# bf16, context 1024, a graphed decode step at batch 1 took 6.10 ms with it against 6.48 ms with
# the grouped kernels, and 18.57 against 18.56 ms at batch 16 (docs/benchmarks.md; `pdserve bench
# decode-step --model-config qwen3-30b-a3b --batch-sizes 1,16 --try moe.USE_SMALL_BATCH_MOE=True`).
# Mixtral's expert shapes have not been timed on it.
USE_SMALL_BATCH_MOE = True

# architecture -> (the layer's MLP module name, the expert's gate, up and down tensor names)
_CHECKPOINT_NAMES = {
    "Qwen3MoeForCausalLM": ("mlp", "gate_proj", "up_proj", "down_proj"),
    "MixtralForCausalLM": ("block_sparse_moe", "w1", "w3", "w2"),
}


class SparseMoeBlock(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        experts, hidden, inter = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.num_experts = experts
        self.top_k = config.num_experts_per_tok
        self.intermediate_size = inter
        self.renormalize = config.norm_topk_prob
        # Qwen3-MoE rounds the routing weights to the model's dtype before weighting the
        # experts' outputs; Mixtral weights them in float32 (transformers' two models).
        self.weights_in_model_dtype = config.architecture == "Qwen3MoeForCausalLM"
        self.router_weight = nn.Parameter(torch.empty(experts, hidden), requires_grad=False)
        self.w13 = nn.Parameter(torch.empty(experts, 2 * inter, hidden), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(experts, hidden, inter), requires_grad=False)
        # fp32 [E, 2I] and [E, H], one scale per expert's output row, while w13 and w2 are fp8
        self.w13_scale: torch.Tensor | None = None
        self.w2_scale: torch.Tensor | None = None
        self.group = None  # a TensorParallelGroup when this rank holds a slice of every expert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = linear(x, self.router_weight)  # a small batch on CUDA: the Triton small-M matmul
        kernels = fused_moe_kernels(x)
        if kernels is not None and USE_SMALL_BATCH_MOE and x.shape[0] <= kernels.SMALL_BATCH_MAX_TOKENS:
            y = kernels.fused_moe_small_batch(
                x,
                self.w13,
                self.w2,
                logits,
                self.top_k,
                self.renormalize,
                self.weights_in_model_dtype,
                self.w13_scale,
                self.w2_scale,
            )
        else:
            weights, ids = select_experts(logits, self.top_k, self.renormalize)
            if self.weights_in_model_dtype:
                weights = weights.to(x.dtype)
            if kernels is not None:
                y = kernels.fused_moe(x, self.w13, self.w2, weights, ids, self.w13_scale, self.w2_scale)
            else:
                y = fused_moe(x, self.w13, self.w2, weights, ids)
        return y if self.group is None else self.group.all_reduce(y)

    def quantize_fp8(self) -> None:
        """--quantization fp8 on loaded dense experts: one scale per (expert, output row),
        amax / 448, as Fp8Weight.quantize gives a linear layer's output channels. Kept in
        fp8 where the Triton kernels serve this layer and the device has fp8; elsewhere the
        quantized values are dequantized into the dense weights (the reference, or the
        kernels in the model dtype). One expert at a time, so the fp32 temporaries stay an
        expert's size."""
        keep = _kernels_read_fp8(self.w13)
        with torch.no_grad():
            for name in ("w13", "w2"):
                dense = getattr(self, name)
                values = torch.empty(dense.shape, dtype=FP8, device=dense.device) if keep else None
                scales = torch.empty(dense.shape[:2], dtype=torch.float32, device=dense.device)
                for e in range(self.num_experts):
                    q, scales[e] = quantize_rows(dense[e])
                    if keep:
                        values[e] = q
                    else:
                        dense[e] = (q.float() * scales[e, :, None]).to(dense.dtype)
                if keep:
                    setattr(self, name, nn.Parameter(values, requires_grad=False))
                    setattr(self, f"{name}_scale", scales)

    def weight_targets(self, architecture: str, prefix: str) -> dict[str, torch.Tensor]:
        """Checkpoint tensor name -> the slice of the stacked weights it loads into."""
        module = _CHECKPOINT_NAMES[architecture][0]
        n = self.intermediate_size
        targets = {f"{prefix}{module}.gate.weight": self.router_weight}
        for e, (gate, up, down) in enumerate(expert_tensor_names(architecture, prefix, self.num_experts)):
            targets[gate] = self.w13[e, :n]
            targets[up] = self.w13[e, n:]
            targets[down] = self.w2[e]
        return targets


def expert_tensor_names(architecture: str, prefix: str, num_experts: int) -> list[tuple[str, str, str]]:
    """(gate, up, down) checkpoint names of each expert of the layer whose names start with `prefix`."""
    module, gate, up, down = _CHECKPOINT_NAMES[architecture]
    return [
        tuple(f"{prefix}{module}.experts.{e}.{name}.weight" for name in (gate, up, down))
        for e in range(num_experts)
    ]


def fused_moe_kernels(t: torch.Tensor):
    """common.models.fused_moe_triton when t is on a CUDA device and triton imports, else None
    (the torch reference serves)."""
    if not (t.is_cuda and USE_TRITON_MOE):
        return None
    return triton_module("common.models.fused_moe_triton")


def _kernels_read_fp8(t: torch.Tensor) -> bool:
    """Whether the Triton kernels serve t's device and can read fp8 there: float8_e4m3fn
    needs compute capability 8.9 (Ada, Hopper) or more."""
    if fused_moe_kernels(t) is None:
        return False
    return not t.is_cuda or torch.cuda.get_device_capability(t.device) >= (8, 9)


def experts_capture_in_cuda_graphs(model: nn.Module) -> bool:
    """Whether every mixture-of-experts layer of `model` runs without reading back to the host
    (the Triton kernels), as a CUDA graph needs; True for a dense model."""
    return all(fused_moe_kernels(m.w13) is not None for m in model.modules() if isinstance(m, SparseMoeBlock))


def experts_in_fp8(model: nn.Module) -> bool:
    """Whether `model`'s experts are held in fp8 (--quantization fp8 where the kernels read it)."""
    return any(m.w13.dtype == FP8 for m in model.modules() if isinstance(m, SparseMoeBlock))
