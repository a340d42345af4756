"""The plain-torch mixture-of-experts computation: pick each token's experts, run every expert once.

The CPU path runs it, and a fused GPU kernel is tested against it, so it keeps the kernel's
signature: the routing (`select_experts`) apart from the experts' matmuls (`fused_moe`),
experts' weights stacked into one tensor per layer (gate rows then up rows in `w13`).

Tokens are sorted by expert so each expert that has tokens runs as one matmul over all of
them, instead of one small matmul per (token, expert) pair; the weighted outputs are
scattered back with one index_add in that sorted order, which sums each token's experts in
ascending expert order, as transformers does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def select_experts(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_weights [T, k] float32, topk_ids [T, k] int64) from router_logits [T, E].

    Softmax over all experts in float32, the k most probable, and, with `renormalize`,
    their weights divided by their sum (Mixtral always; Qwen3-MoE when norm_topk_prob).
    """
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def fused_moe(
    x: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2I, H]: each expert's gate rows, then its up rows
    w2: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, k]
    topk_ids: torch.Tensor,  # [T, k]
) -> torch.Tensor:
    """sum over each token's k experts of weight * down(silu(gate(x)) * up(x)), [T, H] in x's dtype.

    The products with the weights are taken in the promoted dtype of the expert output and
    `topk_weights` (float32 weights with bf16 activations multiply in float32, as Mixtral
    does; weights cast to bf16 first multiply in bf16, as Qwen3-MoE does)."""
    tokens, k = topk_ids.shape
    intermediate = w2.shape[2]
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    token_of = order // k  # the token each sorted (token, slot) pair came from
    counts = torch.bincount(flat_ids, minlength=w13.shape[0]).tolist()
    routed = x[token_of]
    out = torch.empty(tokens * k, w2.shape[1], dtype=x.dtype, device=x.device)
    start = 0
    for expert, n in enumerate(counts):
        if n == 0:
            continue
        rows = slice(start, start + n)
        gate, up = F.linear(routed[rows], w13[expert]).split(intermediate, dim=-1)
        out[rows] = F.linear(F.silu(gate) * up, w2[expert])
        start += n
    weighted = out * topk_weights.reshape(-1)[order].unsqueeze(-1)
    result = torch.zeros_like(x)
    return result.index_add_(0, token_of, weighted.to(x.dtype))
