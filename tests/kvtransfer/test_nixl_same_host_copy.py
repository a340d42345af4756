"""NixlConnector on one machine: a producer in this process is copied from directly and
released by the side channel's "done" notice; with same_host_copy off, or a producer in
another process on CPU (CUDA IPC needs both caches on a GPU), pulls are NIXL READs."""

from __future__ import annotations

import logging
import time
import uuid

import pytest
import torch
from kv_transfer_harness import block_content, local_cache, make_consumer, wait_pull

from common.config.kv_transfer_config import KVTransferConfig
from kvtransfer.factory import create_connector
from kvtransfer.nixl_connector import nixl_available

pytestmark = pytest.mark.skipif(not nixl_available(), reason="needs the NIXL Python package")


def config(connector: str, role: str, **extra) -> KVTransferConfig:
    return KVTransferConfig.from_dict(
        {
            "kv_connector": connector,
            "kv_role": role,
            "kv_port": 0,
            "kv_connector_extra_config": {"transfer_timeout_s": 5.0, **extra},
        }
    )


def in_process_producer(kv_spec, connector: str = "NixlConnector", **extra):
    producer = create_connector(config(connector, "kv_producer", **extra), None, kv_spec)
    cache = torch.zeros(kv_spec.kv_cache_shape(12))
    for b in range(1, 12):
        cache[b] = block_content(kv_spec, b)
    producer.register_kv_cache(cache)
    return producer


def wait_freed(producer, request_id: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if request_id in producer.take_freed_requests():
            return
        time.sleep(0.01)
    raise AssertionError(f"the producer still holds {request_id!r}")


def pull_and_check(producer, consumer, kv_spec) -> str:
    """Pull three blocks into other local blocks, check them and the untouched ones."""
    rid = f"req-{uuid.uuid4().hex[:8]}"
    params = producer.export_blocks(rid, [2, 4, 6, 8], num_tokens=16)
    consumer.start_pull(rid, params, [9, 7, 5], [4, 6, 8])
    assert wait_pull(consumer, rid) is None
    cache = local_cache(consumer)
    for local_id, remote_id in [(9, 4), (7, 6), (5, 8)]:
        assert torch.equal(cache[local_id], block_content(kv_spec, remote_id))
    assert not cache[[0, 1, 2, 3, 4, 6, 8, 10]].any()
    records = consumer.take_transfer_records()
    assert [(r.request_id, r.num_bytes) for r in records] == [(rid, 3 * cache[0].numel() * 4)]
    return rid


def test_a_nixl_pull_from_a_producer_in_this_process_copies_directly_and_releases_the_lease(kv_spec, caplog):
    producer = in_process_producer(kv_spec)
    consumer = make_consumer("NixlConnector", kv_spec)
    try:
        with caplog.at_level(logging.INFO, logger="kvtransfer.direct_copy"):
            rid = pull_and_check(producer, consumer, kv_spec)
        assert consumer.stats()["num_direct_transfers"] == 1
        wait_freed(producer, rid)  # by the "done" notice: a direct copy sends no READ notification
        assert "copy its KV cache directly (same_process" in caplog.text
        second = pull_and_check(producer, consumer, kv_spec)  # the source is kept
        assert consumer.stats()["num_direct_transfers"] == 2
        assert consumer.stats()["num_handshakes"] == 1
        wait_freed(producer, second)
    finally:
        consumer.close()
        producer.close()


@pytest.mark.parametrize("off_side", ["consumer", "producer"])
def test_with_same_host_copy_off_on_either_side_a_pull_in_this_process_is_a_nixl_read(kv_spec, off_side):
    producer_extra = {"same_host_copy": "off"} if off_side == "producer" else {}
    consumer_extra = {"same_host_copy": "off"} if off_side == "consumer" else {}
    producer = in_process_producer(kv_spec, **producer_extra)
    consumer = make_consumer("NixlConnector", kv_spec, **consumer_extra)
    try:
        rid = pull_and_check(producer, consumer, kv_spec)
        assert consumer.stats()["num_direct_transfers"] == 0
        wait_freed(producer, rid)  # by the READ's notification
        reply = next(iter(consumer._consumer._engines.values())).reply
        assert reply.nixl is not None
        assert (reply.cuda_ipc is None) == (off_side == "producer")
    finally:
        consumer.close()
        producer.close()


@pytest.mark.parametrize(
    ("producer_connector", "consumer_connector"),
    [("CudaIpcConnector", "NixlConnector"), ("NixlConnector", "CudaIpcConnector")],
)
def test_nixl_and_cuda_ipc_connectors_in_one_process_copy_directly_from_each_other(
    kv_spec, producer_connector, consumer_connector
):
    producer = in_process_producer(kv_spec, producer_connector)
    consumer = make_consumer(consumer_connector, kv_spec)
    try:
        rid = pull_and_check(producer, consumer, kv_spec)
        assert consumer.stats()["num_direct_transfers"] == 1
        assert producer.stats()["bytes_served"] == 0  # nothing went over the side channel
        wait_freed(producer, rid)
    finally:
        consumer.close()
        producer.close()


def test_a_nixl_producer_in_another_process_on_cpu_is_pulled_by_nixl_read(producers, kv_spec, caplog):
    producer = producers.get("NixlConnector")
    consumer = make_consumer("NixlConnector", kv_spec)
    served = producers.process.stats(producer)["bytes_served"]  # other tests share this producer
    try:
        rid = f"req-{uuid.uuid4().hex[:8]}"
        params = producers.process.export(producer, rid, [3, 5, 7], num_tokens=12)
        with caplog.at_level(logging.INFO, logger="kvtransfer.direct_copy"):
            consumer.start_pull(rid, params, [1, 2, 3], [3, 5, 7])
            assert wait_pull(consumer, rid) is None
        cache = local_cache(consumer)
        for local_id, remote_id in [(1, 3), (2, 5), (3, 7)]:
            assert torch.equal(cache[local_id], block_content(kv_spec, remote_id))
        assert consumer.stats()["num_direct_transfers"] == 0
        reply = next(iter(consumer._consumer._engines.values())).reply
        assert reply.nixl is not None and reply.cuda_ipc is not None  # it offers both
        assert "go by NIXL READ: CUDA IPC needs both KV caches in GPU memory" in caplog.text
        producers.process.wait_freed(producer, rid, timeout_s=5)
        assert producers.process.stats(producer)["bytes_served"] == served  # nothing over TCP
    finally:
        consumer.close()


@pytest.mark.parametrize("value", ["on", True, "", None, ["auto"]])
def test_a_bad_same_host_copy_value_is_refused_naming_the_key(kv_spec, value):
    with pytest.raises(
        ValueError, match=r'kv_connector_extra_config\.same_host_copy must be "auto" or "off"'
    ):
        create_connector(config("NixlConnector", "kv_both", same_host_copy=value), None, kv_spec)
