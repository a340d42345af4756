"""Pulls between KV caches in GPU memory: the producer in another process, both caches
on the device (NIXL reads device memory; TCP goes through pinned host memory)."""

from __future__ import annotations

import pytest
import torch
from conftest import CONNECTORS
from kv_transfer_harness import ProducerProcess, block_content, local_cache, make_consumer, wait_pull

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("connector_name", CONNECTORS)
def test_a_pull_between_gpu_caches_copies_the_listed_blocks_exactly(connector_name, kv_spec):
    process = ProducerProcess()
    consumer = make_consumer(connector_name, kv_spec, device="cuda")
    try:
        producer, _ = process.create(connector_name, kv_spec, 16, device="cuda")
        params = process.export(producer, "gpu-req", [2, 4, 6, 8], num_tokens=16)
        consumer.start_pull("gpu-req", params, [9, 7, 5], [4, 6, 8])
        assert wait_pull(consumer, "gpu-req") is None
        cache = local_cache(consumer)
        assert cache.is_cuda
        for local_id, remote_id in [(9, 4), (7, 6), (5, 8)]:
            assert torch.equal(cache[local_id].cpu(), block_content(kv_spec, remote_id))
        assert not cache[[0, 1, 2, 3, 4, 6, 8]].any()
        process.wait_freed(producer, "gpu-req", timeout_s=5)
    finally:
        consumer.close()
        process.close()
