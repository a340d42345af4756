"""On a GPU: a decode step under several LoRA adapters gives the same logits through the
captured CUDA graphs (Triton LoRA kernels) as through the eager torch path, and the greedy
tokens of a LoRA engine do not depend on the graphs. Run with `python -m pytest -m gpu tests/lora`."""

from __future__ import annotations

import pytest
import torch

from common.config.engine_config import EngineConfig
from common.config.lora_config import LoRAConfig
from common.engine.llm_engine import LLMEngine
from common.lora import lora_layer
from common.lora.lora_request import LoRARequest
from common.sampling_params import SamplingParams
from tests.lora.test_peft_adapter import write_adapter
from tests.tiny_llama import tiny_llama

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)


@pytest.fixture(scope="module")
def cuda_tiny():
    model, config = tiny_llama()
    return model.to("cuda"), config


def _engine(cuda_tiny, enforce_eager: bool) -> LLMEngine:
    model, config = cuda_tiny
    engine_config = EngineConfig(
        device="cuda",
        max_model_len=128,
        enforce_eager=enforce_eager,
        lora_config=LoRAConfig(enable_lora=True, max_loras=3, max_lora_rank=16, max_cpu_loras=3),
    )
    return LLMEngine.from_config(engine_config, model=model, model_config=config)


def test_greedy_tokens_under_adapters_are_the_same_with_graphs_and_eagerly(cuda_tiny, tmp_path, monkeypatch):
    _, config = cuda_tiny
    targets = (("q_proj", "v_proj"), ("o_proj", "gate_proj", "up_proj", "down_proj"), ("k_proj",))
    loras = [
        LoRARequest(f"g{i}", str(write_adapter(tmp_path / f"g{i}", config, r=4 * (i + 1), targets=t)), i + 1)
        for i, t in enumerate(targets)
    ]
    prompts = [[(7 * i + 3 * k) % 60 + 1 for k in range(5 + 3 * i)] for i in range(8)]
    assigned = [loras[i % 3] if i % 4 else None for i in range(len(prompts))]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    graphs = _engine(cuda_tiny, enforce_eager=False)
    assert graphs.runner.cuda_graphs is not None
    with_graphs = graphs.generate(prompts, params, loras=assigned)
    del graphs
    monkeypatch.setattr(lora_layer, "_triton_ops", False)  # the torch path on the GPU
    eager = _engine(cuda_tiny, enforce_eager=True).generate(prompts, params, loras=assigned)
    assert with_graphs == eager
