"""A KV transfer that stalls past its timeout, with real processes on loopback and the
TcpConnector (its bytes go over the side channel): the decode worker reaches the prefill
worker's side channel through a relay in this test (the prefill worker binds 127.0.0.2
and announces 127.0.0.3, where the relay listens). With the relay frozen, bytes go
nowhere and the connections stay open: the decode worker's pull gives up after
transfer_timeout_s and, with kv_load_failure_policy "recompute", prefills the prompt
itself, so the client still gets the aggregated engine's greedy tokens. The prefill
worker never hears from the consumer, so its lease runs out: the blocks are freed and
its KV usage returns to where it was.

(kill -9 of the prefill worker with requests in flight: tests/e2e/test_prefill_worker_killed.py.)
"""

from __future__ import annotations

import json
import select
import socket
import threading

import httpx
import pytest

from common.sampling_params import SamplingParams
from tests.harness.faults import ENGINE_FLAGS, events_config
from tests.harness.stack import (
    RouterProcess,
    WorkerProcess,
    free_address,
    free_port,
    metric,
    start_stack,
    stop_all,
    wait_until,
)

TRANSFER_TIMEOUT_S = 3
LEASE_S = 6
MAX_TOKENS = 6
BASELINE = "Write a short note about the moon and its phases. " * 6
STALLED = "Write a short note about the tides and the wind. " * 6


class Relay:
    """TCP from `listen` to `target`; `freeze()` stops moving bytes but keeps connections open."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int]) -> None:
        self.target = target
        self.server = socket.create_server(listen)
        self.running = threading.Event()
        self.running.set()
        self.closed = False
        self.sockets: list[socket.socket] = [self.server]
        threading.Thread(target=self._accept, daemon=True).start()

    def freeze(self) -> None:
        self.running.clear()

    def close(self) -> None:
        self.closed = True
        self.running.set()
        for sock in self.sockets:
            sock.close()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        peer = {a: b, b: a}
        try:
            while not self.closed:
                ready, _, _ = select.select([a, b], [], [], 0.2)
                for sock in ready:
                    self.running.wait()  # frozen: hold the bytes, answer nothing
                    data = sock.recv(1 << 16)
                    if not data:
                        return
                    peer[sock].sendall(data)
        except OSError:
            return


@pytest.fixture(scope="module")
def expected(smollm2_model, smollm2_source):
    from common.config.engine_config import EngineConfig
    from common.engine.llm_engine import LLMEngine
    from common.tokenizer import load_tokenizer

    model, model_config = smollm2_model
    tokenizer = load_tokenizer(smollm2_source)
    engine = LLMEngine.from_config(
        EngineConfig(device="cpu", max_model_len=1024, num_gpu_blocks_override=256),
        model=model,
        model_config=model_config,
    )
    prompt = tokenizer.encode(STALLED)
    return prompt, engine.generate([prompt], SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))[0]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("stall")
    kv_port = free_port()
    relay = Relay(("127.0.0.3", kv_port), ("127.0.0.2", kv_port))
    producer = {
        "kv_connector": "TcpConnector",  # its bytes go over the side channel, hence the relay
        "kv_role": "kv_producer",
        "kv_port": kv_port,
        "kv_ip": "127.0.0.2",
        "kv_connector_extra_config": {"side_channel_host": "127.0.0.3", "kv_lease_duration": LEASE_S},
    }
    consumer = {
        "kv_connector": "TcpConnector",
        "kv_role": "kv_consumer",
        "kv_port": 0,
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"transfer_timeout_s": TRANSFER_TIMEOUT_S},
    }
    prefill = WorkerProcess(
        "prefill",
        [*ENGINE_FLAGS, "--kv-transfer-config", json.dumps(producer), "--kv-events-config", events_config()],
        workdir, address=free_address(), start=False,
    )  # fmt: skip
    decode = WorkerProcess(
        "decode", [*ENGINE_FLAGS, "--kv-transfer-config", json.dumps(consumer)], workdir,
        address=free_address(), start=False,
    )  # fmt: skip
    router = RouterProcess(
        ["--prefill-workers", prefill.address, "--decode-workers", decode.address,
         "--local-prefill-threshold", "0"],
        start=False,
    )  # fmt: skip
    try:
        start_stack([prefill, decode], router)
        yield relay, prefill, decode, router
    finally:
        stop_all([router, prefill, decode])
        relay.close()


def _complete(url: str, prompt: str | list[int]) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "return_token_ids": True}
    return httpx.post(url + "/v1/completions", json=body, timeout=120)


def test_stalled_kv_pull_is_recomputed_and_the_lease_frees_the_prefill_blocks(stack, expected):
    relay, prefill, decode, router = stack
    response = _complete(router.url, BASELINE)  # a pull that works, through the relay
    assert response.status_code == 200, response.text
    assert metric(router.url, "pdserve_router_prefill_decisions_total", decision="remote") == 1
    assert decode.metric("pdserve:kv_load_failures_total") == 0
    wait_until(
        lambda: prefill.metric("pdserve:kv_held_requests") == 0,
        30,
        "the prefill worker frees the pulled blocks",
    )
    baseline_usage = prefill.metric("vllm:kv_cache_usage_perc")

    relay.freeze()
    prompt, tokens = expected
    response = _complete(router.url, prompt)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["token_ids"] == tokens
    assert metric(router.url, "pdserve_router_prefill_decisions_total", decision="remote") == 2
    assert decode.metric("pdserve:kv_load_failures_total") == 1  # it was the pull that failed

    wait_until(
        lambda: prefill.metric("pdserve:kv_lease_expired_requests_total") == 1,
        LEASE_S + 30,
        "the prefill worker's lease runs out",
    )
    wait_until(lambda: prefill.metric("pdserve:kv_held_requests") == 0, 10, "nothing is held any more")
    assert prefill.metric("vllm:kv_cache_usage_perc") == baseline_usage
