"""`pdserve serve -tp 2`: a prefill worker and a decode worker of two rank processes each, the
KV of every prompt moved rank to rank (TcpConnector), behind the router; greedy completions
equal the single-process engine's."""

from __future__ import annotations

import httpx
import pytest

from common.config.engine_config import EngineConfig
from common.engine.llm_engine import LLMEngine
from common.sampling_params import SamplingParams
from tests.harness.stack import ServeStack

PROMPTS = [[1, 504, 3458, 282, 4649, 314, 7042, 30, 2], list(range(100, 160))]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def stack():
    serve = ServeStack(
        [
            "--device", "cpu", "--dtype", "float32", "--max-model-len", "256",
            "--tensor-parallel-size", "2",
            "--kv-transfer-config", '{"kv_connector": "TcpConnector", "kv_role": "kv_both"}',
            "--num-prefill-workers", "1", "--local-prefill-threshold", "0",
            "--worker-health-timeout", "60",
        ]
    )  # fmt: skip
    try:
        yield serve.ready()
    finally:
        serve.stop()


@pytest.fixture(scope="module")
def expected(smollm2_model) -> list[list[int]]:
    model, model_config = smollm2_model
    engine = LLMEngine.from_config(
        EngineConfig(max_model_len=256, seed=0), model=model, model_config=model_config
    )
    return engine.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))


def test_tensor_parallel_workers_behind_the_router_give_the_single_process_tokens(stack, expected):
    for prompt, tokens in zip(PROMPTS, expected, strict=True):
        body = {
            "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True,
        }  # fmt: skip
        response = httpx.post(stack.url + "/v1/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["token_ids"] == tokens
    decisions = httpx.get(stack.url + "/metrics", timeout=10).text
    assert 'pdserve_router_prefill_decisions_total{decision="remote"' in decisions
