"""A real `pdserve prefill` and `pdserve decode` (tiny model, TcpConnector on host memory):
after one disaggregated request the decode worker's /metrics holds one
pdserve:kv_pull_seconds observation, whose bytes are the pulled blocks' KV, and `bench
serve`'s scrape of that endpoint reads the same pull beside the connector's own."""

from __future__ import annotations

import json

import pytest

from common.sampling_params import SamplingParams
from pdserve.bench.serve.kv_pulls import WorkerMetricsScrape, kv_pull_figures
from tests.harness import worker_client as wc
from tests.harness.stack import running_pair

GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
PROMPT_LEN = 37  # five blocks of 8 tokens, the last one partly filled
FLOAT32_BYTES = 4


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("kv-pull-metrics")
    model = wc.write_tiny_model(workdir / "tiny")
    flags = ["--model", str(model), *wc.TINY_ENGINE_FLAGS]
    with running_pair(
        workdir,
        [*flags, *wc.kv_transfer_flag("TcpConnector", "kv_producer")],
        [*flags, *wc.kv_transfer_flag("TcpConnector", "kv_consumer", transfer_timeout_s=10)],
    ) as pair:
        yield pair, json.loads((model / "config.json").read_text())


def test_one_disaggregated_request_records_one_pull_of_its_blocks_kv_bytes(workers):
    (prefill, decode), config = workers
    scrape = WorkerMetricsScrape([decode.metrics_url])
    before = scrape.snapshot()
    p, d = wc.Client(prefill.address), wc.Client(decode.address)
    try:
        tokens, answer = wc.prefill_then_decode(p, d, "pulled", wc.random_prompt(7, PROMPT_LEN), GREEDY)
    finally:
        p.close()
        d.close()
    assert answer.kv_transfer_params is not None and len(tokens) == GREEDY.max_tokens

    block_size = int(wc.TINY_ENGINE_FLAGS[wc.TINY_ENGINE_FLAGS.index("--block-size") + 1])
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    block_bytes = (
        config["num_hidden_layers"]
        * 2
        * config["num_key_value_heads"]
        * block_size
        * head_dim
        * FLOAT32_BYTES
    )
    pulled_bytes = -(-PROMPT_LEN // block_size) * block_bytes
    assert decode.metric("pdserve:kv_pull_seconds_count") == 1
    assert decode.metric("pdserve:kv_pull_seconds_sum") > 0
    assert decode.metric("pdserve:kv_pull_bytes_count") == 1
    assert decode.metric("pdserve:kv_pull_bytes_sum") == pulled_bytes
    assert decode.metric("vllm:nixl_bytes_transferred_sum") == pulled_bytes  # the connector moved the same
    # the whole path holds the connector's own span of the data movement
    assert decode.metric("pdserve:kv_pull_seconds_sum") >= decode.metric("vllm:nixl_xfer_time_seconds_sum")
    assert prefill.metric("pdserve:kv_pull_seconds_count") == 0  # a producer pulls nothing

    figures = kv_pull_figures(before, scrape.snapshot())
    assert figures.num_pulls == 1 and figures.num_failed_pulls == 0
    assert figures.mean_pull_bytes == pulled_bytes
    assert figures.num_connector_transfers == 1
    assert figures.mean_pull_ms >= figures.mean_connector_xfer_ms > 0
