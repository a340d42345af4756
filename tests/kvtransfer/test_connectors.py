"""Both connectors, producer in another process, consumer here: what a pull moves, when
the producer lets its blocks go, and what happens when something is wrong."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import torch
import zmq
from kv_transfer_harness import ProducerProcess, block_content, local_cache, make_consumer, wait_pull

from kvtransfer.kv_cache_spec import KVCacheSpec

SHORT_LEASE_S = 0.5
CONNECTORS = ["TcpConnector", "NixlConnector"]


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex[:10]}"


def test_pull_copies_the_listed_remote_blocks_into_the_given_local_blocks(
    producers, connector_name, consumer, kv_spec
):
    producer = producers.get(connector_name)
    rid = new_request_id()
    params = producers.process.export(producer, rid, [3, 5, 7, 9, 11, 13, 15], num_tokens=27)
    assert params["do_remote_prefill"] is True
    assert params["remote_block_ids"] == [3, 5, 7, 9, 11, 13, 15]
    assert params["remote_num_tokens"] == 27

    # the consumer already holds the first two blocks: it pulls the other five
    local_ids, remote_ids = [2, 4, 6, 8, 10], [7, 9, 11, 13, 15]
    consumer.start_pull(rid, params, local_ids, remote_ids)
    assert wait_pull(consumer, rid) is None

    cache = local_cache(consumer)
    for local_id, remote_id in zip(local_ids, remote_ids, strict=True):
        assert torch.equal(cache[local_id], block_content(kv_spec, remote_id))
    untouched = [b for b in range(cache.shape[0]) if b not in local_ids]
    assert not cache[untouched].any()


def test_a_finished_pull_releases_the_producers_blocks(producers, connector_name, consumer):
    producer = producers.get(connector_name)
    rid = new_request_id()
    params = producers.process.export(producer, rid, [1, 2], num_tokens=8)
    consumer.start_pull(rid, params, [5, 6], [1, 2])
    assert wait_pull(consumer, rid) is None
    producers.process.wait_freed(producer, rid, timeout_s=5)
    assert rid not in producers.process.take_freed(producer)  # reported once


def test_counters_and_records_describe_finished_pulls(producers, connector_name, consumer):
    producer = producers.get(connector_name)
    rid = new_request_id()
    params = producers.process.export(producer, rid, [4, 5, 6], num_tokens=12)
    consumer.start_pull(rid, params, [1, 2, 3], [4, 5, 6])
    assert wait_pull(consumer, rid) is None
    stats = consumer.stats()
    assert stats["num_transfers"] == 1
    assert stats["bytes_transferred"] == 3 * 1024
    assert stats["num_descriptors"] == 3
    assert stats["num_failed_transfers"] == 0
    assert stats["transfer_time_s"] > 0
    (record,) = consumer.take_transfer_records()
    assert (record.request_id, record.num_bytes, record.num_descriptors) == (rid, 3 * 1024, 3)
    assert consumer.take_transfer_records() == []


def test_notify_done_releases_blocks_that_are_never_pulled(producers, connector_name, consumer):
    producer = producers.get(connector_name)
    rid = new_request_id()
    params = producers.process.export(producer, rid, [8, 9], num_tokens=8)
    consumer.notify_done(rid, params)
    producers.process.wait_freed(producer, rid, timeout_s=5)


def test_a_pull_of_no_blocks_completes_and_releases_the_producer(producers, connector_name, consumer):
    producer = producers.get(connector_name)
    rid = new_request_id()
    params = producers.process.export(producer, rid, [10, 11], num_tokens=8)
    consumer.start_pull(rid, params, [], [])  # everything was a local prefix hit
    assert wait_pull(consumer, rid) is None
    producers.process.wait_freed(producer, rid, timeout_s=5)


def test_blocks_are_freed_when_the_lease_expires_without_notice(producers, connector_name):
    producer = producers.get(connector_name, kv_lease_duration=SHORT_LEASE_S)
    rid = new_request_id()
    producers.process.export(producer, rid, [12, 13], num_tokens=8)
    assert rid not in producers.process.take_freed(producer)
    waited = producers.process.wait_freed(producer, rid, timeout_s=5)
    assert waited > SHORT_LEASE_S / 2  # not before the lease ran out (the export took some time)


def test_a_pull_after_the_lease_expired_fails_instead_of_reading_reused_blocks(
    producers, connector_name, consumer
):
    producer = producers.get(connector_name, kv_lease_duration=SHORT_LEASE_S)
    rid = new_request_id()
    params = producers.process.export(producer, rid, [14, 15], num_tokens=8)
    producers.process.wait_freed(producer, rid, timeout_s=5)
    consumer.start_pull(rid, params, [1, 2], [14, 15])
    error = wait_pull(consumer, rid)
    assert error is not None and "lease" in error
    assert not local_cache(consumer)[[1, 2]].any()


def test_a_consumer_with_an_incompatible_cache_is_refused(producers, connector_name, kv_spec):
    producer = producers.get(connector_name)
    other = KVCacheSpec(
        kv_spec.model, kv_spec.dtype, kv_spec.num_kv_heads, kv_spec.head_size, 2, block_size=8
    )
    consumer = make_consumer(connector_name, other)
    try:
        rid = new_request_id()
        params = producers.process.export(producer, rid, [16, 17], num_tokens=8)
        consumer.start_pull(rid, params, [1, 2], [16, 17])
        error = wait_pull(consumer, rid)
        assert error is not None
        assert "incompatible" in error and "block_size" in error
        assert not local_cache(consumer).any()
        # the refused pull still tells the producer to let the blocks go
        producers.process.wait_freed(producer, rid, timeout_s=5)
    finally:
        consumer.close()


def test_params_from_another_engine_on_the_same_address_fail_the_pull(producers, connector_name, consumer):
    producer = producers.get(connector_name)
    rid = new_request_id()
    params = producers.process.export(producer, rid, [18], num_tokens=4)
    consumer.start_pull(rid, {**params, "remote_engine_id": "some-other-engine"}, [1], [18])
    error = wait_pull(consumer, rid)
    assert error is not None and "no longer the engine" in error


def test_malformed_params_come_back_as_a_failed_pull(connector_name, consumer):
    consumer.start_pull("bad-params", {"remote_host": "127.0.0.1"}, [1], [2])
    error = wait_pull(consumer, "bad-params")
    assert error is not None and "kv_transfer_params" in error and "remote_engine_id" in error


def test_start_pull_rejects_block_ids_that_cannot_pair_up(connector_name, consumer):
    params = {
        "remote_engine_id": "e",
        "remote_host": "127.0.0.1",
        "remote_port": 9,
        "remote_request_id": "r",
        "remote_block_ids": [3, 4],
    }
    with pytest.raises(ValueError, match="pair up"):
        consumer.start_pull("r", params, [1], [3, 4])
    with pytest.raises(ValueError, match="outside"):
        consumer.start_pull("r", params, [0, 1], [3, 4])  # block 0 is the null block
    with pytest.raises(ValueError, match="not among"):
        consumer.start_pull("r", params, [1, 2], [3, 5])


def test_a_stalled_producer_fails_the_pull_after_the_timeout(connector_name, kv_spec):
    context = zmq.Context()
    silent = context.socket(zmq.ROUTER)  # accepts connections, never answers
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    consumer = make_consumer(connector_name, kv_spec, transfer_timeout_s=0.5)
    try:
        params = {
            "remote_engine_id": "silent",
            "remote_host": "127.0.0.1",
            "remote_port": port,
            "remote_request_id": "r",
            "remote_block_ids": [1],
        }
        started = time.monotonic()
        consumer.start_pull("r", params, [1], [1])
        error = wait_pull(consumer, "r", timeout_s=10)
        assert error is not None and f"tcp://127.0.0.1:{port}" in error and "0.5 s" in error
        assert time.monotonic() - started >= 0.5
        assert consumer.stats()["num_failed_transfers"] == 1
    finally:
        consumer.close()
        silent.close(linger=0)
        context.term()


def test_pulls_from_a_killed_producer_fail_within_the_timeout(kv_spec):
    process = ProducerProcess()  # its own process: this test kills it
    consumers = {name: make_consumer(name, kv_spec, transfer_timeout_s=1.0) for name in CONNECTORS}
    try:
        later = {}
        for name, consumer in consumers.items():
            producer, _ = process.create(name, kv_spec, 8)
            first, second = new_request_id(), new_request_id()
            params = process.export(producer, first, [1], num_tokens=4)
            later[name] = (second, process.export(producer, second, [2], num_tokens=4))
            consumer.start_pull(first, params, [1], [1])
            assert wait_pull(consumer, first) is None
        process.kill()
        for name, consumer in consumers.items():
            second, params = later[name]
            consumer.start_pull(second, params, [2], [2])
        for name, consumer in consumers.items():
            error = wait_pull(consumer, later[name][0], timeout_s=10)
            assert error is not None and "producer at tcp://127.0.0.1:" in error, (name, error)
            assert not local_cache(consumer)[2].any()
    finally:
        for consumer in consumers.values():
            consumer.close()
        process.close()


def test_a_tcp_consumer_can_pull_from_a_nixl_producer(producers, kv_spec):
    producer = producers.get("NixlConnector")
    consumer = make_consumer("TcpConnector", kv_spec)
    try:
        rid = new_request_id()
        params = producers.process.export(producer, rid, [20, 21], num_tokens=8)
        consumer.start_pull(rid, params, [3, 4], [20, 21])
        assert wait_pull(consumer, rid) is None
        assert torch.equal(local_cache(consumer)[3], block_content(kv_spec, 20))
        assert torch.equal(local_cache(consumer)[4], block_content(kv_spec, 21))
        producers.process.wait_freed(producer, rid, timeout_s=5)
    finally:
        consumer.close()


def test_a_nixl_consumer_refuses_a_tcp_producer_with_a_clear_error(producers, kv_spec):
    producer = producers.get("TcpConnector")
    consumer = make_consumer("NixlConnector", kv_spec)
    try:
        rid = new_request_id()
        params = producers.process.export(producer, rid, [22], num_tokens=4)
        consumer.start_pull(rid, params, [1], [22])
        error = wait_pull(consumer, rid)
        assert error is not None and "TcpConnector" in error and "no NIXL agent" in error
        producers.process.wait_freed(producer, rid, timeout_s=5)
    finally:
        consumer.close()


def test_the_pull_waker_is_called_when_a_pull_lands_and_when_one_fails(producers, connector_name, consumer):
    """A worker sleeping between its checks of the connector learns of every outcome at once."""
    woken = threading.Event()
    consumer.set_pull_waker(woken.set)
    producer = producers.get(connector_name)
    rid = new_request_id()
    params = producers.process.export(producer, rid, [1, 2], num_tokens=8)
    consumer.start_pull(rid, params, [5, 6], [1, 2])
    assert woken.wait(timeout=10)
    assert wait_pull(consumer, rid) is None

    woken.clear()
    consumer.start_pull("bad-params", {"do_remote_prefill": True}, [], [])
    assert woken.wait(timeout=10)
    assert wait_pull(consumer, "bad-params") is not None
