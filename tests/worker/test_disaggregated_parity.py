"""The embedded model through a real prefill worker, a KV transfer and a real decode worker
gives the aggregated engine's greedy tokens, token for token: with TcpConnector, with
NixlConnector on host memory, and on the decode worker's local-prefill path."""

from __future__ import annotations

import pytest

from common.sampling_params import SamplingParams
from tests.harness.stack import running_pair
from tests.harness.worker_client import Client, kv_transfer_flag, prefill_then_decode, tokens_of

TEXTS = [
    "The three primary colors are red, yellow and blue. Mixing two of them gives a secondary color, for example",
    "def fibonacci(n):\n",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
]
GREEDY = SamplingParams(max_tokens=10, temperature=0.0)
ENGINE_FLAGS = [
    "--dtype", "float32", "--quantization", "none", "--device", "cpu", "--max-model-len", "512", "--num-gpu-blocks-override", "128",
]  # fmt: skip


@pytest.fixture(scope="module")
def prompts(smollm2_source) -> list[list[int]]:
    from common.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(smollm2_source)
    return [tokenizer.encode(text) for text in TEXTS]


@pytest.fixture(scope="module")
def expected(smollm2_model, prompts) -> list[list[int]]:
    from common.config.engine_config import EngineConfig
    from common.engine.llm_engine import LLMEngine

    model, model_config = smollm2_model
    engine = LLMEngine.from_config(
        EngineConfig(device="cpu", max_model_len=512, num_gpu_blocks_override=128),
        model=model,
        model_config=model_config,
    )
    return engine.generate(prompts, GREEDY)


@pytest.fixture(scope="module", params=["TcpConnector", "NixlConnector"])
def pair(request, tmp_path_factory):
    connector = request.param
    workdir = tmp_path_factory.mktemp(connector)
    with running_pair(
        workdir,
        [*ENGINE_FLAGS, *kv_transfer_flag(connector, "kv_producer")],
        [*ENGINE_FLAGS, *kv_transfer_flag(connector, "kv_consumer")],
    ) as (prefill, decode):
        yield connector, prefill, decode


def test_remote_prefill_pull_and_decode_equal_the_aggregated_engine(pair, prompts, expected):
    connector, prefill, decode = pair
    assert prefill.info["kv_connector"] == decode.info["kv_connector"] == connector
    p, d = Client(prefill.address), Client(decode.address)
    try:
        for i, prompt in enumerate(prompts):
            tokens, answer = prefill_then_decode(p, d, f"parity-{i}", prompt, GREEDY)
            assert answer.kv_transfer_params is not None  # the first token did not end it
            assert tokens == expected[i], f"prompt {i}"
        # every prompt's blocks really moved over this connector
        assert decode.metric("vllm:nixl_num_descriptors_count") == len(prompts)
        assert decode.metric("vllm:nixl_num_failed_transfers_total") == 0
        # the local-prefill path (conditional disaggregation) gives them too
        for i, prompt in enumerate(prompts):
            d.generate(f"local-{i}", prompt, GREEDY)
            assert tokens_of(d.stream(f"local-{i}")) == expected[i], f"prompt {i}"
    finally:
        p.close()
        d.close()
