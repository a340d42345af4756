"""The torch mixture-of-experts reference: routing equal to transformers' routers, experts' sum
equal to a per-(token, expert) loop and to transformers' expert modules given the same weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from common.models.fused_moe_reference import fused_moe, select_experts

transformers = pytest.importorskip("transformers")
from transformers.models.mixtral import modeling_mixtral  # noqa: E402
from transformers.models.qwen3_moe import modeling_qwen3_moe  # noqa: E402

TOKENS, HIDDEN, INTER, EXPERTS, TOP_K = 13, 32, 24, 8, 2


def random_experts(dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(TOKENS, HIDDEN, generator=g)
    w13 = 0.2 * torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=g)
    w2 = 0.2 * torch.randn(EXPERTS, HIDDEN, INTER, generator=g)
    router = 0.5 * torch.randn(EXPERTS, HIDDEN, generator=g)
    return x.to(dtype), w13.to(dtype), w2.to(dtype), router.to(dtype)


def loop_moe(x, w13, w2, weights, ids):
    """Each token through each of its experts, one at a time, summed in float64."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for slot in range(ids.shape[1]):
            e = int(ids[t, slot])
            gate, up = (w13[e].double() @ x[t].double()).split(INTER)
            out[t] += float(weights[t, slot]) * (w2[e].double() @ (F.silu(gate) * up))
    return out


@pytest.mark.parametrize("renormalize", [True, False])
def test_experts_sum_equals_a_loop_over_each_token_and_expert(renormalize):
    x, w13, w2, router = random_experts()
    weights, ids = select_experts(x @ router.T, TOP_K, renormalize)
    assert len(ids.unique()) > TOP_K  # tokens spread over several experts
    torch.testing.assert_close(
        fused_moe(x, w13, w2, weights, ids), loop_moe(x, w13, w2, weights, ids).float()
    )


def test_experts_without_tokens_are_never_run():
    x, w13, w2, _ = random_experts()
    ids = torch.tensor([[3, 5]] * TOKENS)  # only experts 3 and 5 have tokens
    weights = torch.full((TOKENS, 2), 0.5)
    w13[[0, 1, 2, 4, 6, 7]] = float("nan")  # would poison the output if any idle expert ran
    out = fused_moe(x, w13, w2, weights, ids)
    assert not out.isnan().any()
    torch.testing.assert_close(out, loop_moe(x, w13, w2, weights, ids).float())


def test_renormalized_weights_sum_to_one_and_pick_the_largest_logits():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.5], [3.0, 0.0, 0.0, 2.9]])
    weights, ids = select_experts(logits, 2, renormalize=True)
    assert weights.dtype == torch.float32
    assert ids.tolist() == [[1, 3], [0, 3]]
    torch.testing.assert_close(weights.sum(-1), torch.ones(2))
    # renormalised softmax over all experts = softmax over the chosen logits alone
    torch.testing.assert_close(weights[0], torch.softmax(torch.tensor([2.0, 1.5]), -1))
    plain, _ = select_experts(logits, 2, renormalize=False)
    assert float(plain[0].sum()) < 1.0


def load_hf_block(block, router, w13, w2):
    with torch.no_grad():
        block.gate.weight.copy_(router)
        block.experts.gate_up_proj.copy_(w13)
        block.experts.down_proj.copy_(w2)
    return block.eval()


def hf_config(cls, **fields):
    return cls(
        hidden_size=HIDDEN,
        num_experts_per_tok=TOP_K,
        num_local_experts=EXPERTS,
        hidden_act="silu",
        **fields,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_matches_transformers_qwen3_moe_block(dtype, norm_topk_prob):
    x, w13, w2, router = random_experts(dtype)
    config = hf_config(
        transformers.Qwen3MoeConfig, moe_intermediate_size=INTER, norm_topk_prob=norm_topk_prob
    )
    block = load_hf_block(modeling_qwen3_moe.Qwen3MoeSparseMoeBlock(config).to(dtype), router, w13, w2)
    weights, ids = select_experts(F.linear(x, router), TOP_K, norm_topk_prob)
    ours = fused_moe(x, w13, w2, weights.to(dtype), ids)  # Qwen3-MoE weights in the model's dtype
    with torch.no_grad():
        theirs = block(x.unsqueeze(0))[0]
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_transformers_mixtral_block(dtype):
    x, w13, w2, router = random_experts(dtype)
    config = hf_config(transformers.MixtralConfig, intermediate_size=INTER)
    block = load_hf_block(modeling_mixtral.MixtralSparseMoeBlock(config).to(dtype), router, w13, w2)
    weights, ids = select_experts(F.linear(x, router), TOP_K, renormalize=True)
    ours = fused_moe(x, w13, w2, weights, ids)  # Mixtral weights the outputs in float32
    with torch.no_grad():
        theirs = block(x.unsqueeze(0))[0]
    torch.testing.assert_close(ours, theirs)
