"""Mixture-of-experts models with --tensor-parallel-size 2 on CPU (gloo): each rank holds every
expert's slice of the intermediate columns, and the greedy tokens equal one process's."""

from __future__ import annotations

import pytest
import torch

from common.config.engine_config import EngineConfig
from common.distributed.shard_plan import plan_shards, rank_model_config
from common.engine.llm_engine import LLMEngine
from common.models.config import ModelConfig
from common.sampling_params import SamplingParams
from tests.tiny_llama import tiny_hf_config

transformers = pytest.importorskip("transformers")

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
# An expert width that 2 ranks split unevenly (25 and 26 columns)
QWEN3_MOE = dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=51, norm_topk_prob=True)


def test_each_rank_holds_every_experts_slice_of_the_intermediate_columns():
    config = ModelConfig.from_hf_config(tiny_hf_config("Qwen3MoeForCausalLM", **QWEN3_MOE))
    shards = plan_shards(config, 2)
    assert [s.intermediate for s in shards] == [(0, 25), (25, 51)]
    rank1 = rank_model_config(config, shards[1])
    assert (rank1.num_experts, rank1.moe_intermediate_size) == (6, 26)
    assert rank1.intermediate_size == config.intermediate_size  # the dense width is not the experts'


@pytest.fixture(scope="module")
def tiny_moe_folder(tmp_path_factory):
    config = transformers.Qwen3MoeConfig(
        vocab_size=62, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, max_position_embeddings=128, intermediate_size=64, **QWEN3_MOE,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, 0.3)
    folder = tmp_path_factory.mktemp("tiny-moe-tp")
    model.save_pretrained(folder)
    return str(folder)


def test_qwen3_moe_greedy_outputs_with_two_ranks_equal_one_process(tiny_moe_folder, hang_guard):
    prompts = [[3, 14, 15, 9, 26, 5], [35, 8], list(range(40))]

    def engine(tp: int) -> LLMEngine:
        return LLMEngine.from_config(
            EngineConfig(
                model=tiny_moe_folder,
                tensor_parallel_size=tp,
                seed=0,
                block_size=4,
                enable_chunked_prefill=True,
                max_num_batched_tokens=24,
            )  # fmt: skip
        )

    expected = engine(1).generate(prompts, GREEDY)
    sharded = engine(2)
    try:
        assert sharded.generate(prompts, GREEDY) == expected
    finally:
        sharded.shutdown()
    assert [p.poll() for p in sharded.executor.rank_processes] == [0]
