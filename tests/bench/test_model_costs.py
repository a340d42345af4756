"""The counts every floor rests on (pdserve/bench/model_costs.py): parameters, prefill FLOPs
and decode bytes, against a hand count, against the parameters of the real module, and at
Llama-3-8B's shapes against its published size."""

from __future__ import annotations

import pytest
import torch

from common.attention.backend_select import get_attention_backend
from common.models.llama import LlamaForCausalLM
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
