"""The counts every floor rests on (pdserve/bench/model_costs.py): parameters, prefill FLOPs
and decode bytes, against a hand count, against the parameters of the real module (dense,
mixture-of-experts, fp8), and at each bundled config's shapes against its published size."""

from __future__ import annotations

import pytest
import torch

from common.attention.backend_select import get_attention_backend
from common.models.layers import Linear
from common.models.llama import LlamaForCausalLM
from common.models.weights_dummy import fill_dummy_weights
from common.models.weights_fp8 import quantize_linears
from pdserve.bench.dummy_model import read_model_config
from pdserve.bench.model_costs import ModelCosts
from tests.tiny_llama import tiny_config

# hidden 8, MLP 16, 2 layers, 2 query heads and 1 KV head of 4 dims, vocabulary 10
HAND = dict(
    vocab_size=10,
    hidden_size=8,
    intermediate_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=4,
)


def test_parameters_and_prefill_flops_match_a_hand_count():
    costs = ModelCosts.from_config(tiny_config(**HAND))
    # a layer: qkv 8 x (8 + 4 + 4) = 128, o 8 x 8 = 64, gate_up 8 x 32 = 256, down 16 x 8 = 128
    assert costs.layer_matmul_params == 2 * 576
    assert (costs.embedding_params, costs.lm_head_params) == (80, 80)
    assert costs.norm_params == 2 * 16 + 8
    assert costs.total_params == 1152 + 160 + 40
    # 3 tokens: projections 2 x 1152 x 3; attention sees 1 + 2 + 3 = 6 (query, key) pairs,
    # 4 x 4 dims x 2 heads x 2 layers each; the LM head on the last row only, 2 x 80
    assert costs.attention_flops(3) == 4 * 4 * 2 * 2 * 6
    assert costs.prefill_flops(3) == 2 * 1152 * 3 + 384 + 160
    assert costs.prefill_flops(3, num_prompts=5) == 5 * costs.prefill_flops(3)
    # K and V of a token: 2 x 2 layers x 1 head x 4 dims, 2 bytes each
    assert costs.kv_bytes_per_token(2) == 32


def test_chunking_a_prompt_leaves_its_attention_flops_unchanged():
    costs = ModelCosts.from_config(tiny_config(**HAND))
    whole = costs.attention_flops(100)
    assert costs.attention_flops(64) + costs.attention_flops(36, prefix=64) == whole
    assert sum(costs.attention_flops(10, prefix=p) for p in range(0, 100, 10)) == whole


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_word_embeddings": True},
        {"architecture": "Qwen2ForCausalLM", "attention_bias": True},
        {
            "architecture": "Qwen3ForCausalLM",
            "qk_norm": True,
            "attention_bias": True,
            "attention_out_bias": True,
        },
    ],
    ids=["llama", "tied", "qwen2-biases", "qwen3-qk-norm"],
)
def test_the_count_is_the_real_modules_parameter_count(overrides):
    config = tiny_config(**overrides)
    model = LlamaForCausalLM(config, get_attention_backend("cpu"))
    params = list(model.parameters())  # a tied table once
    assert ModelCosts.from_config(config).total_params == sum(p.numel() for p in params)


@pytest.mark.parametrize("tied", [False, True])
def test_a_decode_step_reads_every_weight_once_and_only_the_batchs_embedding_rows(tied):
    config = tiny_config(tie_word_embeddings=tied)
    model = LlamaForCausalLM(config, get_attention_backend("cpu")).to(torch.bfloat16)
    every_weight = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.embed_tokens
    expected = every_weight if tied else every_weight - embed.numel() * 2 + 3 * embed.shape[1] * 2
    assert ModelCosts.from_config(config).decode_weight_bytes(3, bytes_per_param=2) == expected


def test_llama_3_8b_shapes_count_8_03_billion_parameters():
    config = read_model_config("llama-3-8b")
    assert config.vocab_size == 128256  # the bundled config keeps Llama 3's real vocabulary
    costs = ModelCosts.from_config(config)
    assert costs.total_params == 8_030_261_248
    assert costs.layer_matmul_params == 32 * 218_103_808
    # docs/benchmarks.md's decode floor: 15.01 GB of weights a step at batch 1
    assert costs.decode_weight_bytes(1, bytes_per_param=2) == pytest.approx(15.01e9, rel=1e-3)
    # a 2048-token prompt: 29.7 TFLOP, 3.7% of it attention
    assert costs.prefill_flops(2048) == pytest.approx(29.69e12, rel=1e-3)
    assert costs.attention_flops(2048) / costs.prefill_flops(2048) == pytest.approx(0.0371, abs=1e-4)


# the hand model's shapes with 4 experts of width 16 a layer, 2 a token, in place of the MLP
HAND_MOE = dict(
    HAND,
    architecture="Qwen3MoeForCausalLM",
    qk_norm=True,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    norm_topk_prob=True,
)
MOE_OVERRIDES = {
    "qwen3-moe": dict(
        architecture="Qwen3MoeForCausalLM", qk_norm=True, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=24, norm_topk_prob=True,
    ),
    "mixtral": dict(
        architecture="MixtralForCausalLM", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
        norm_topk_prob=True,
    ),
}  # fmt: skip


def test_experts_count_whole_in_the_parameters_and_k_of_them_in_a_tokens_flops():
    costs = ModelCosts.from_config(tiny_config(**HAND_MOE))
    # a layer: qkv 128 + o 64 = 192 attention, router 4 x 8 = 32, 4 experts of 3 x 8 x 16 = 384
    assert (costs.attention_params, costs.mlp_params) == (2 * 192, 0)
    assert (costs.router_params, costs.expert_params) == (2 * 32, 2 * 4 * 384)
    assert costs.active_expert_params == 2 * 2 * 384
    assert costs.norm_params == 2 * (16 + 8) + 8  # q/k norms of 4 dims in each layer
    assert costs.total_params == 384 + 64 + 3072 + 160 + 56
    assert costs.dense_params == costs.total_params - 3072
    assert costs.active_params == costs.total_params - 3072 + 1536
    # 3 tokens: each through attention, the router and 2 experts (2 x (192 + 32 + 768) a layer)
    assert costs.prefill_flops(3) == 2 * 2 * (192 + 32 + 768) * 3 + 384 + 160


def test_experts_touched_are_k_for_one_token_and_tend_to_every_expert():
    costs = ModelCosts.from_config(tiny_config(**HAND_MOE))
    assert costs.experts_touched(1) == pytest.approx(2)
    # each expert missed by a token with probability 1 - 2/4: by both of 2 tokens 1/4 of the time
    assert costs.experts_touched(2) == pytest.approx(4 * (1 - 0.25))
    assert costs.experts_touched(64) == pytest.approx(4)
    assert ModelCosts.from_config(tiny_config(**HAND)).experts_touched(64) == 0


def test_a_moe_decode_step_reads_the_shared_weights_and_the_experts_its_tokens_touch():
    costs = ModelCosts.from_config(tiny_config(**HAND_MOE))
    # shared: attention 384, router 64, norms 56, LM head 80 and the batch's embedding rows
    shared = 384 + 64 + 56 + 80
    one_expert = 2 * 384  # one expert in each of the 2 layers
    assert costs.decode_weight_bytes(1, 2) == pytest.approx((shared + 8 + 2 * one_expert) * 2)
    assert costs.decode_weight_bytes(2, 2) == pytest.approx((shared + 16 + 3 * one_expert) * 2)
    every = costs.decode_weight_bytes(1, 2, experts_read=4)
    assert every == pytest.approx((shared + 8 + 4 * one_expert) * 2)


def test_fp8_counts_a_byte_per_linear_weight_and_a_scale_per_row_the_rest_in_the_dtype():
    costs = ModelCosts.from_config(tiny_config(**HAND))
    # linears: qkv 16 rows, o 8, gate_up 32, down 8 in each layer: 128 scales; 1152 weights
    assert (costs.fp8_params, costs.linear_rows) == (1152, 2 * 64)
    embedding_rows, lm_head, norms = 8, 80, 40
    dense = (embedding_rows + lm_head + norms) * 2
    assert costs.decode_weight_bytes(1, 2, fp8_linears=True) == 1152 + 128 * 4 + dense
    # only the experts' attention is fp8; the experts and the router stay in the dtype
    moe = ModelCosts.from_config(tiny_config(**HAND_MOE))
    assert (moe.fp8_params, moe.linear_rows) == (2 * 192, 2 * 24)
    saved = moe.fp8_params * (2 - 1) - moe.linear_rows * 4
    assert moe.decode_weight_bytes(1, 2, fp8_linears=True) == moe.decode_weight_bytes(1, 2) - saved
    # a prefill's fp8 part: the linears fp8 keeps, 2 FLOPs a weight a token
    assert costs.prefill_fp8_flops(3, 2) == 2 * 1152 * 3 * 2


@pytest.mark.parametrize("overrides", MOE_OVERRIDES.values(), ids=MOE_OVERRIDES.keys())
def test_the_moe_count_is_the_real_modules_parameter_count(overrides):
    config = tiny_config(**overrides)
    model = LlamaForCausalLM(config, get_attention_backend("cpu"))
    costs = ModelCosts.from_config(config)
    assert costs.total_params == sum(p.numel() for p in model.parameters())
    experts = sum(layer.mlp.w13.numel() + layer.mlp.w2.numel() for layer in model.layers)
    assert costs.expert_params == experts
    assert costs.router_params == sum(layer.mlp.router_weight.numel() for layer in model.layers)


@pytest.mark.parametrize(
    "overrides", [{}, MOE_OVERRIDES["qwen3-moe"], {"tie_word_embeddings": True}], ids=["dense", "moe", "tied"]
)
def test_fp8_bytes_are_what_the_quantized_model_holds(overrides):
    """Every fp8 weight and scale the loader keeps, plus every parameter it leaves dense, at
    the dtype's 2 bytes: the count of a batch-1 step reading all experts and the whole table."""
    config = tiny_config(**overrides)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config, get_attention_backend("cpu")).to(torch.bfloat16)
    fill_dummy_weights(model, seed=0)
    quantize_linears(model)
    packed = [m.packed for m in model.modules() if isinstance(m, Linear) and m.packed is not None]
    dense = [
        p
        for name, p in model.named_parameters()
        if not (name.endswith("proj.weight") and p.stride() == (0, 0))
    ]
    held = sum(w.nbytes() for w in packed) + sum(p.numel() * 2 for p in dense)
    costs = ModelCosts.from_config(config)
    embedding_rows = costs.hidden_size if costs.lm_head_params else 0
    all_experts = costs.num_experts or None
    step = costs.decode_weight_bytes(1, 2, fp8_linears=True, experts_read=all_experts)
    table = costs.embedding_params * 2 - embedding_rows * 2 if costs.lm_head_params else 0
    assert step + table == held


# (name, total parameters, active a token, batch-1 bf16 weight bytes, the same in fp8)
BUNDLED = [
    ("llama-3-8b", 8_030_261_248, 8_030_261_248, 15.010e9, 8.036e9),
    ("llama-3.1-70b", 70_553_706_496, 70_553_706_496, 139.006e9, 70.582e9),
    ("qwen3-30b-a3b", 30_532_122_624, 3_353_032_704, 6.084e9, 5.179e9),
    ("mixtral-8x7b", 46_702_792_704, 12_879_925_248, 25.498e9, 24.157e9),
]


@pytest.mark.parametrize("name,total,active,bf16_bytes,fp8_bytes", BUNDLED, ids=[b[0] for b in BUNDLED])
def test_bundled_configs_count_their_published_sizes(name, total, active, bf16_bytes, fp8_bytes):
    costs = ModelCosts.from_config(read_model_config(name))
    assert (costs.total_params, costs.active_params) == (total, active)
    assert costs.decode_weight_bytes(1, 2) == pytest.approx(bf16_bytes, rel=1e-4)
    assert costs.decode_weight_bytes(1, 2, fp8_linears=True) == pytest.approx(fp8_bytes, rel=1e-4)


def test_qwen3_30b_a3b_floors_by_batch():
    costs = ModelCosts.from_config(read_model_config("qwen3-30b-a3b"))
    # 48 layers of 128 experts of 3 x 2048 x 768; the rest 1.54 B parameters
    assert costs.expert_params == 48 * 128 * 3 * 2048 * 768
    assert costs.dense_params == 1_541_093_376
    # 64 tokens touch 125.9 of 128 experts a layer under uniform routing
    assert costs.experts_touched(64) == pytest.approx(128 * (1 - (120 / 128) ** 64))
    assert costs.experts_touched(64) == pytest.approx(125.94, abs=0.01)
    assert costs.decode_weight_bytes(64, 2) == pytest.approx(59.51e9, rel=1e-4)
    assert costs.decode_weight_bytes(64, 2, experts_read=128) == pytest.approx(60.442e9, rel=1e-4)
    # a 2048-token prompt: 12.83 TFLOP, of which fp8 would cover only the attention projections
    assert costs.prefill_flops(2048) == pytest.approx(12.835e12, rel=1e-4)
    assert costs.prefill_fp8_flops(2048) == 2 * 48 * (2048 * 5120 + 4096 * 2048) * 2048


def test_fp8_experts_count_a_byte_per_expert_weight_and_a_scale_per_expert_row():
    """On a GPU --quantization fp8 keeps the stacked experts in fp8 too (common/models/moe.py):
    each expert's gate/up (2I rows) and down (H rows) at 1 byte a weight and 4 a row."""
    config = tiny_config(**MOE_OVERRIDES["qwen3-moe"])
    costs = ModelCosts.from_config(config)
    e, h, i = config.num_experts, config.hidden_size, config.moe_intermediate_size
    layers = config.num_hidden_layers
    dense = costs.decode_weight_bytes(1, 2, experts_read=e)
    fp8 = costs.decode_weight_bytes(1, 2, fp8_experts=True, experts_read=e)
    assert fp8 == pytest.approx(dense - layers * e * 3 * h * i + layers * e * (2 * i + h) * 4)
    # at batch 1 only the token's k experts are read, in fp8 as well
    k = config.num_experts_per_tok
    one = costs.decode_weight_bytes(1, 2, fp8_experts=True)
    assert one == pytest.approx(
        costs.decode_weight_bytes(1, 2) - layers * k * 3 * h * i + layers * k * (2 * i + h) * 4
    )
