"""NixlConnector on a GPU: a producer process's cache on the same machine is mapped through
CUDA IPC and copied directly, unless same_host_copy is off, when pulls are NIXL READs."""

from __future__ import annotations

import uuid

import pytest
import torch
from kv_transfer_harness import ProducerProcess, block_content, local_cache, make_consumer, wait_pull

from common.config.kv_transfer_config import KVTransferConfig
from kvtransfer.factory import create_connector
from kvtransfer.nixl_connector import nixl_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not nixl_available(), reason="needs the NIXL Python package"),
]


@pytest.mark.parametrize(("same_host_copy", "direct"), [("auto", True), ("off", False)])
def test_a_nixl_pull_from_another_process_on_the_gpu_copies_directly_unless_turned_off(
    kv_spec, same_host_copy, direct
):
    process = ProducerProcess()
    consumer = make_consumer("NixlConnector", kv_spec, device="cuda", same_host_copy=same_host_copy)
    try:
        producer, _ = process.create("NixlConnector", kv_spec, 16, device="cuda")
        for _ in range(2):  # the second pull reuses the mapping (or the loaded agent)
            rid = f"nixl-{uuid.uuid4().hex[:8]}"
            params = process.export(producer, rid, [2, 4, 6, 8], num_tokens=16)
            consumer.start_pull(rid, params, [9, 7, 5], [4, 6, 8])
            assert wait_pull(consumer, rid) is None
            process.wait_freed(producer, rid, timeout_s=5)  # by "done", or by the READ's notification
        cache = local_cache(consumer)
        for local_id, remote_id in [(9, 4), (7, 6), (5, 8)]:
            assert torch.equal(cache[local_id].cpu(), block_content(kv_spec, remote_id))
        assert not cache[[0, 1, 2, 3, 4, 6, 8]].any()
        stats = consumer.stats()
        assert stats["num_direct_transfers"] == (2 if direct else 0)
        assert stats["num_handshakes"] == 1
        assert process.stats(producer)["bytes_served"] == 0  # neither path reads over the side channel
    finally:
        consumer.close()
        process.close()


def test_a_nixl_pull_from_a_gpu_producer_in_this_process_copies_directly(kv_spec):
    config = KVTransferConfig.from_dict(
        {"kv_connector": "NixlConnector", "kv_role": "kv_producer", "kv_port": 0}
    )
    producer = create_connector(config, None, kv_spec)
    source = torch.zeros(kv_spec.kv_cache_shape(12), device="cuda")
    for b in range(1, 12):
        source[b] = block_content(kv_spec, b).cuda()
    producer.register_kv_cache(source)
    consumer = make_consumer("NixlConnector", kv_spec, device="cuda")
    try:
        rid = f"nixl-{uuid.uuid4().hex[:8]}"
        params = producer.export_blocks(rid, [3, 5], num_tokens=8)
        consumer.start_pull(rid, params, [1, 2], [3, 5])
        assert wait_pull(consumer, rid) is None
        cache = local_cache(consumer)
        assert torch.equal(cache[1].cpu(), block_content(kv_spec, 3))
        assert torch.equal(cache[2].cpu(), block_content(kv_spec, 5))
        assert consumer.stats()["num_direct_transfers"] == 1
    finally:
        consumer.close()
        producer.close()
