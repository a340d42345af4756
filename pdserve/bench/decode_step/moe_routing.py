"""How many experts a decode step really reads: the distinct experts its tokens pick in each
mixture-of-experts layer, counted in one eager forward.

The decode-step floor assumes uniform routing (pdserve/bench/model_costs.py,
ModelCosts.experts_touched); dummy weights route close to uniformly, and this count says how
close, beside the floor it qualifies.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from common.models import layers
from common.models.fused_moe_reference import select_experts
from common.models.moe import SparseMoeBlock


def measured_experts_touched(model: torch.nn.Module, forward: Callable[[], object]) -> float:
    """The mean over the model's expert layers of the distinct experts the tokens of one
    call of `forward` (an eager forward of the batch) route to. The forward runs layer by layer
    (the fused small-batch layer off), where each block's forward is called and can be
    counted; the routing is the same on either path."""
    counts: list[int] = []

    def count(block: SparseMoeBlock, args: tuple) -> None:
        # the block's own routing, recomputed from its input: the same top-k it takes
        _, ids = select_experts(F.linear(args[0], block.router_weight), block.top_k, block.renormalize)
        counts.append(int(ids.unique().numel()))

    blocks = [m for m in model.modules() if isinstance(m, SparseMoeBlock)]
    handles = [block.register_forward_pre_hook(count) for block in blocks]
    fused = layers.FUSE_SMALL_BATCH_QWEN3
    layers.FUSE_SMALL_BATCH_QWEN3 = False
    try:
        with torch.inference_mode():
            forward()
    finally:
        layers.FUSE_SMALL_BATCH_QWEN3 = fused
        for handle in handles:
            handle.remove()
    if not counts:
        raise ValueError("the model has no mixture-of-experts layer to count experts in")
    return sum(counts) / len(counts)
