"""On a GPU: the greedy tokens of requests under several LoRA adapters, mixed with base-model
requests, are the same through the captured CUDA graphs (the Triton LoRA kernels in every
replay) as eagerly, and the adapters change them. Run with `python -m pytest -m gpu tests/lora`."""

from __future__ import annotations

import pytest
import torch

from common.config.engine_config import EngineConfig
from common.config.lora_config import LoRAConfig
from common.engine.llm_engine import LLMEngine
from common.lora.lora_request import LoRARequest
from common.sampling_params import SamplingParams
from tests.engine.test_cuda_graphs import tiny_config, tiny_model
from tests.lora.test_peft_adapter import write_adapter

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def cuda_tiny():
    config = tiny_config(head_dim=64, max_positions=256)
    return tiny_model(config, "cuda", torch.bfloat16, std=0.1), config


def _engine(cuda_tiny, enforce_eager: bool) -> LLMEngine:
    model, config = cuda_tiny
    engine_config = EngineConfig(
        device="cuda",
        max_model_len=128,
        enforce_eager=enforce_eager,
        lora_config=LoRAConfig(enable_lora=True, max_loras=3, max_lora_rank=16, max_cpu_loras=3),
    )
    return LLMEngine.from_config(engine_config, model=model, model_config=config)


def test_greedy_tokens_under_adapters_are_the_same_with_graphs_and_eagerly(cuda_tiny, tmp_path):
    _, config = cuda_tiny
    targets = (("q_proj", "v_proj"), ("o_proj", "gate_proj", "up_proj", "down_proj"), ("k_proj",))
    loras = [
        LoRARequest(
            f"g{i}", str(write_adapter(tmp_path / f"g{i}", config, r=4 * (i + 1), targets=t, std=0.1)), i + 1
        )
        for i, t in enumerate(targets)
    ]
    prompts = [[(7 * i + 3 * k) % 120 + 1 for k in range(5 + 3 * i)] for i in range(8)]
    assigned = [loras[i % 3] if i % 4 else None for i in range(len(prompts))]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    graphs = _engine(cuda_tiny, enforce_eager=False)
    assert graphs.runner.cuda_graphs is not None and not graphs.runner.lora_slots.host_groups
    with_graphs = graphs.generate(prompts, params, loras=assigned)
    base = graphs.generate(prompts, params)
    del graphs
    eager = _engine(cuda_tiny, enforce_eager=True).generate(prompts, params, loras=assigned)
    assert with_graphs == eager
    assert [w != b for w, b in zip(with_graphs, base, strict=True)] == [lora is not None for lora in assigned]
