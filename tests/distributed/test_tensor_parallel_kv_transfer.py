"""Disaggregated prefill and decode engines with tensor parallelism on CPU (gloo): every rank
has its own cache and connector, each decode rank pulls the KV heads it owns from the
prefill rank(s) holding them, and the greedy tokens equal the single-process engine's.

Real rank processes; the hang_guard fixture bounds every test.
"""

from __future__ import annotations

import time

import pytest

from common.config.engine_config import EngineConfig
from common.config.kv_transfer_config import KVTransferConfig
from common.engine.llm_engine import LLMEngine
from common.sampling_params import SamplingParams
from common.worker.run_worker import kv_cache_spec_fields
from decode_worker.consumer import ConsumerHooks
from kvtransfer.factory import create_engine_connector
from kvtransfer.kv_cache_spec import KVCacheSpec
from prefill_worker.producer import ProducerHooks

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
PROMPTS = [
    [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407],
    list(range(1000, 1040)),  # several blocks
]
STEP_LIMIT_S = 120


def engine_with_connector(model: str, tp: int, role: str) -> LLMEngine:
    engine = LLMEngine.from_config(
        EngineConfig(model=model, tensor_parallel_size=tp, seed=0, max_model_len=256)
    )
    transfer = KVTransferConfig(kv_connector="TcpConnector", kv_role=role, kv_port=0)
    spec = KVCacheSpec(**kv_cache_spec_fields(engine, "smollm2"))
    connector = create_engine_connector(transfer, role, spec, tp_size=tp)
    hooks = ProducerHooks if role == "kv_producer" else ConsumerHooks
    engine.attach_kv_transfer(connector, [hooks.for_engine(engine, connector)])
    return engine


def run_until(engine: LLMEngine, request_id: str) -> list:
    outputs = []
    deadline = time.monotonic() + STEP_LIMIT_S
    while not (outputs and outputs[-1].finished):
        assert time.monotonic() < deadline, f"request {request_id} did not finish"
        if engine.has_schedulable_requests():
            step = engine.step()
        else:
            engine.process_kv_transfers()
            step = []
        outputs += [o for o in step if o.request_id == request_id]
        if not step:
            time.sleep(0.005)
    return outputs


def disaggregated(prefill: LLMEngine, decode: LLMEngine, prompt: list[int], request_id: str) -> list[int]:
    prefill.add_request(request_id, prompt, GREEDY, prefill_only=True)
    (answer,) = [o for o in run_until(prefill, request_id) if o.finished]
    assert answer.error is None and answer.kv_transfer_params is not None
    first = answer.new_token_ids[-1]
    decode.add_request(
        request_id, prompt, GREEDY, kv_transfer_params={**answer.kv_transfer_params, "first_token_id": first}
    )
    tokens = [first]
    for output in run_until(decode, request_id):
        assert output.error is None, output.error
        tokens += output.new_token_ids
    # the decode engine released the prefill engine's blocks once every rank had pulled them
    deadline = time.monotonic() + 10
    while prefill.scheduler.num_held and time.monotonic() < deadline:
        prefill.process_kv_transfers()
        time.sleep(0.01)
    assert prefill.scheduler.num_held == 0
    return tokens


@pytest.fixture(scope="module")
def expected(smollm2_model) -> list[list[int]]:
    model, model_config = smollm2_model
    single = LLMEngine.from_config(
        EngineConfig(max_model_len=256, seed=0), model=model, model_config=model_config
    )
    return single.generate(PROMPTS, GREEDY)


@pytest.mark.parametrize(("prefill_tp", "decode_tp"), [(2, 1), (1, 2), (2, 2)])
def test_disaggregated_greedy_outputs_with_tensor_parallel_workers_equal_one_process(
    smollm2_source, expected, prefill_tp, decode_tp, hang_guard
):
    model = str(smollm2_source.path)
    prefill = engine_with_connector(model, prefill_tp, "kv_producer")
    try:
        decode = engine_with_connector(model, decode_tp, "kv_consumer")
        try:
            got = [disaggregated(prefill, decode, p, f"req-{i}") for i, p in enumerate(PROMPTS)]
            assert got == expected
            assert decode.kv_connector.stats()["bytes_transferred"] > 0
        finally:
            decode.kv_connector.close()
            decode.shutdown()
    finally:
        prefill.kv_connector.close()
        prefill.shutdown()
