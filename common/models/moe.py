"""The sparse mixture-of-experts MLP of Qwen3-MoE and Mixtral, and where its weights come from.

A router (a bias-free matmul) scores every expert for each token; the token's top-k
experts, SiLU-gated MLPs, each run on it and their outputs are summed with the routing
weights (common/models/fused_moe_reference.py). Each layer's experts are held stacked,
`w13 [E, 2I, H]` (gate rows, then up rows) and `w2 [E, H, I]`: the checkpoint's
per-expert tensors load straight into slices of them (weight_targets), so stacking costs
no second copy.

Under tensor parallelism each rank holds every expert's slice of the intermediate columns
(vLLM's split): its experts' outputs are partial sums, all-reduced once per layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.models.config import ModelConfig
from common.models.fused_moe_reference import fused_moe, select_experts

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
        self.group = None  # a TensorParallelGroup when this rank holds a slice of every expert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = select_experts(F.linear(x, self.router_weight), self.top_k, self.renormalize)
        if self.weights_in_model_dtype:
            weights = weights.to(x.dtype)
        y = fused_moe(x, self.w13, self.w2, weights, ids)
        return y if self.group is None else self.group.all_reduce(y)

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
