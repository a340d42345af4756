"""kill -9 of the prefill worker while requests are in flight: the three commands
(`pdserve prefill`, `pdserve decode`, `pdserve router`) on loopback, every prompt sent
to the prefill worker (--local-prefill-threshold 0), the decode worker set to recompute
a failed KV load. Each request in flight when the prefill worker dies completes
(the router hands it to the decode worker, or the decode worker recomputes a pull that
failed) with the aggregated engine's greedy tokens; none fails and none hangs. Afterwards the router still serves, prefilling on the decode worker, and
/health says the prefill role is missing."""

from __future__ import annotations

import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor, wait

import httpx
import pytest

from common.sampling_params import SamplingParams
from tests.harness.stack import RouterProcess, WorkerProcess, metric

MAX_MODEL_LEN = 1024
ENGINE_FLAGS = [
    "--dtype", "float32", "--device", "cpu", "--max-model-len", str(MAX_MODEL_LEN),
    "--num-gpu-blocks-override", "256",
]  # fmt: skip
EVENTS = json.dumps(
    {"enable_kv_cache_events": True, "endpoint": "tcp://127.0.0.1:*", "replay_endpoint": "tcp://127.0.0.1:*"}
)
TOPICS = ["the history of Rome", "how bees make honey", "the water cycle", "why the sky is blue"]
MAX_TOKENS = 6
BOUND_S = 180.0  # every request answered within this, whatever happens


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("killed")
    prefill = WorkerProcess(
        "prefill",
        [*ENGINE_FLAGS, "--kv-transfer-config", '{"kv_port": 0}', "--kv-events-config", EVENTS],
        workdir,
    )
    decode = WorkerProcess(
        "decode",
        [*ENGINE_FLAGS, "--kv-transfer-config", '{"kv_port": 0, "kv_load_failure_policy": "recompute"}',
         "--kv-events-config", EVENTS],
        workdir,
    )  # fmt: skip
    try:
        yield prefill.ready(), decode.ready()
    finally:
        prefill.stop()
        decode.stop()


@pytest.fixture(scope="module")
def router(workers):
    prefill, decode = workers
    process = RouterProcess(
        [
            "--prefill-workers", prefill.address,
            "--decode-workers", decode.address,
            "--max-model-len", str(MAX_MODEL_LEN),
            "--local-prefill-threshold", "0",
            "--worker-health-timeout", "30",
        ]
    )  # fmt: skip
    try:
        yield process.ready()
    finally:
        process.stop()


@pytest.fixture(scope="module")
def prompts(smollm2_source):
    from common.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(smollm2_source)
    texts = [f"Write a long, detailed and careful essay about {topic}. " * 8 for topic in TOPICS]
    return [tokenizer.encode(text) for text in texts]


@pytest.fixture(scope="module")
def expected(smollm2_model, prompts):
    from common.config.engine_config import EngineConfig
    from common.engine.llm_engine import LLMEngine

    model, model_config = smollm2_model
    config = EngineConfig(device="cpu", max_model_len=MAX_MODEL_LEN, num_gpu_blocks_override=256)
    engine = LLMEngine.from_config(config, model=model, model_config=model_config)
    return engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))


def _complete(url: str, prompt: list[int]) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "return_token_ids": True}
    return httpx.post(url + "/v1/completions", json=body, timeout=BOUND_S)


def test_requests_in_flight_survive_a_killed_prefill_worker_and_the_router_goes_on(
    workers, router, prompts, expected
):
    prefill, _ = workers
    started = time.monotonic()
    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(_complete, router.url, prompt) for prompt in prompts]
        deadline = time.monotonic() + 60
        while metric(router.url, "pdserve_router_requests_routed_total", role="prefill") < len(prompts):
            assert time.monotonic() < deadline, "the requests never reached the prefill worker"
            time.sleep(0.02)
        prefill.proc.send_signal(signal.SIGKILL)
        done, not_done = wait(futures, timeout=BOUND_S)
    assert not not_done, "a request hung after the prefill worker was killed"
    assert time.monotonic() - started < BOUND_S
    for future, tokens in zip(futures, expected, strict=True):
        response = future.result()  # every one completes: nothing accepted is lost
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["token_ids"] == tokens
    # the router noticed at once (the connection closed) and prefilled on the decode worker
    assert metric(router.url, "pdserve_router_prefill_decisions_total", decision="fallback") >= 1

    # afterwards: still served, prefilled on the decode worker; /health names the missing role
    response = _complete(router.url, prompts[0])
    assert response.status_code == 200
    assert response.json()["choices"][0]["token_ids"] == expected[0]
    health = httpx.get(router.url + "/health", timeout=10)
    assert health.status_code == 503
    assert health.json()["message"] == "no healthy prefill worker"
