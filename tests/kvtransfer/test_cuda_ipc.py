"""CudaIpcConnector on CPU: the export message and its checks, the choice of data path,
the block-copy planning and kernel (in Triton's interpreter), a same-process pull through
the direct path, and the TCP fallback for producers in another process."""

from __future__ import annotations

import os
import time
import uuid

import msgpack
import pytest
import torch
import triton
from hypothesis import given, settings
from hypothesis import strategies as st
from kv_transfer_harness import block_content, local_cache, make_consumer, wait_pull

from common.config.kv_transfer_config import KVTransferConfig
from kvtransfer.cuda_ipc_connector import CudaIpcConnector
from kvtransfer.cuda_ipc_copy import (
    BlockIndex,
    _pairs_fit,
    check_pairs,
    copy_blocks,
    launch_copy_kernel,
    plan_copy,
)
from kvtransfer.cuda_ipc_driver import CudaIpcError, handle_bytes, handle_struct
from kvtransfer.cuda_ipc_export import (
    HANDLE_BYTES,
    ROUTE_FALLBACK,
    ROUTE_IPC,
    ROUTE_SAME_PROCESS,
    CudaIpcExport,
    LocalEnd,
    choose_route,
    this_host_id,
)
from kvtransfer.factory import create_connector
from kvtransfer.kv_consumer import RemoteEngine
from kvtransfer.side_channel import HandshakeReply, MessageError
from kvtransfer.tcp_connector import TcpConnector

HOST = this_host_id()


def gpu_export(**changes) -> CudaIpcExport:
    fields = dict(
        host_id=HOST,
        pid=os.getpid() + 1,
        device="cuda",
        device_uuid="GPU-0",
        handle=bytes(range(HANDLE_BYTES)),
        offset=512,
        base_addr=0x7F0000000000,
    )
    return CudaIpcExport(**{**fields, **changes})


# -- the export message ------------------------------------------------------------------


def test_an_export_survives_msgpack_unchanged():
    export = gpu_export()
    wire = msgpack.unpackb(msgpack.packb(export.to_message(), use_bin_type=True), raw=False)
    assert CudaIpcExport.from_message(wire) == export


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"handle": b"\x01" * 63}, "64 bytes"),
        ({"handle": "not bytes"}, "binary"),
        ({"device": "tpu"}, "cuda or cpu"),
        ({"device": "cpu"}, "not on a CUDA device"),
        ({"pid": 0}, "pid"),
        ({"offset": -1}, "offset"),
        ({"base_addr": 1 << 64}, "base_addr"),
        ({"host_id": ""}, "host_id"),
        ({"device_uuid": 5}, "device_uuid"),
    ],
)
def test_a_malformed_export_is_rejected_with_a_message_error(change, complaint):
    message = {**gpu_export().to_message(), **change}
    with pytest.raises(MessageError, match=complaint):
        CudaIpcExport.from_message(message)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["host_id", "pid", "device", "device_uuid", "handle", "offset", "base_addr", "x"]),
        st.none() | st.integers(-5, 2**65) | st.text(max_size=70) | st.binary(max_size=70),
    )
    | st.integers()
    | st.text()
)
def test_any_export_map_is_either_accepted_or_rejected_with_a_message_error(message):
    try:
        export = CudaIpcExport.from_message(message)
    except MessageError:
        return
    assert len(export.handle) in (0, HANDLE_BYTES)
    assert export.device in ("cuda", "cpu")


def test_an_extent_past_the_end_of_the_address_space_is_rejected():
    export = gpu_export(base_addr=(1 << 64) - 4096)
    export.check_extent(num_blocks=1, block_len=1024)
    with pytest.raises(MessageError, match="address space"):
        export.check_extent(num_blocks=8, block_len=1024)


def test_the_handshake_reply_carries_the_export_and_rejects_a_non_map():
    spec = {"model": "m", "dtype": "float32", "num_kv_heads": 1, "head_size": 4, "num_layers": 1}
    reply = {
        "type": "handshake",
        "engine_id": "e",
        "instance_id": "i",
        "compat_hash": "h",
        "kv_spec": {**spec, "block_size": 2, "cache_dtype": "auto"},
        "num_blocks": 4,
        "block_len": 32,
        "tp_size": 1,
        "connector": "CudaIpcConnector",
        "cuda_ipc": gpu_export().to_message(),
    }
    assert CudaIpcExport.from_message(HandshakeReply.from_message(reply).cuda_ipc) == gpu_export()
    with pytest.raises(MessageError, match="cuda_ipc"):
        HandshakeReply.from_message({**reply, "cuda_ipc": [1, 2]})


def test_a_handle_keeps_all_its_bytes_through_the_driver_structure():
    data = bytes([0, 7, 0, 0, 9] + [0] * 58 + [255])  # NULs inside and at the start
    assert handle_bytes(handle_struct(data)) == data
    with pytest.raises(CudaIpcError, match="64 bytes"):
        handle_struct(data[:-1])


# -- the choice of data path -------------------------------------------------------------


LOCAL_GPU = LocalEnd(HOST, os.getpid(), "cuda")


@pytest.mark.parametrize(
    ("export", "local", "route"),
    [
        (gpu_export(), LOCAL_GPU, ROUTE_IPC),
        (None, LOCAL_GPU, ROUTE_FALLBACK),
        (gpu_export(host_id="other-boot/other-host"), LOCAL_GPU, ROUTE_FALLBACK),
        (gpu_export(pid=os.getpid()), LOCAL_GPU, ROUTE_SAME_PROCESS),
        (gpu_export(device="cpu", handle=b""), LOCAL_GPU, ROUTE_FALLBACK),
        (gpu_export(), LocalEnd(HOST, os.getpid(), "cpu"), ROUTE_FALLBACK),
        (gpu_export(handle=b""), LOCAL_GPU, ROUTE_FALLBACK),
    ],
    ids=[
        "same-host-gpus",
        "no-export",
        "other-host",
        "same-process",
        "cpu-producer",
        "cpu-consumer",
        "no-handle",
    ],
)
def test_the_route_is_ipc_only_between_gpu_caches_of_one_machine_with_a_handle(export, local, route):
    chosen, why = choose_route(export, local)
    assert chosen == route
    assert why


# -- block-copy planning and the kernel --------------------------------------------------


def test_the_copy_moves_the_widest_word_that_length_and_both_addresses_allow():
    assert plan_copy(2 << 20, 0, 4096).word_bytes == 8
    assert plan_copy(2 << 20, 4, 4096).word_bytes == 4
    assert plan_copy(6, 0, 0).word_bytes == 2
    assert plan_copy(7, 0, 0).word_bytes == 1


@pytest.mark.parametrize("block_len", [1, 24, 2 << 20, 2 << 20 | 8])
def test_the_copy_chunks_cover_a_block_exactly_once(block_len):
    g = plan_copy(block_len, 0, 0)
    assert g.word_bytes * g.words_per_block == block_len
    assert g.chunk_words & (g.chunk_words - 1) == 0
    assert (g.chunks_per_block - 1) * g.chunk_words < g.words_per_block <= g.chunks_per_block * g.chunk_words


def test_pairs_that_cannot_be_copied_are_refused():
    with pytest.raises(ValueError, match="pair up"):
        check_pairs([1, 2], [3], 8, 8)
    with pytest.raises(ValueError, match="source block ids \\[8\\]"):
        check_pairs([8], [1], 8, 8)
    with pytest.raises(ValueError, match="destination block ids \\[-1\\]"):
        check_pairs([1], [-1], 8, 8)
    with pytest.raises(ValueError, match="repeat"):
        check_pairs([1, 2], [3, 3], 8, 8)
    check_pairs([1, 1], [2, 3], 8, 8)  # one source may feed several destinations


def rows(num_blocks: int, block_len: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (num_blocks, block_len), dtype=torch.uint8, generator=g)


def test_copy_blocks_writes_exactly_the_listed_destinations():
    src, dst = rows(6, 40, 1), torch.zeros(5, 40, dtype=torch.uint8)
    copy_blocks(src, dst, [5, 1, 2], [0, 3, 4])
    assert torch.equal(dst[[0, 3, 4]], src[[5, 1, 2]])
    assert not dst[[1, 2]].any()


@pytest.fixture
def triton_interpreter():
    previous = triton.knobs.runtime.interpret
    triton.knobs.runtime.interpret = True
    yield
    triton.knobs.runtime.interpret = previous


@pytest.mark.parametrize("block_len", [6, 40, 8 * 4096 + 24])  # int16 words; int64; two chunks
def test_the_kernel_copies_like_the_reference_in_the_interpreter(triton_interpreter, block_len):
    src = rows(7, block_len, 2)
    expected = rows(6, block_len, 3)
    got = expected.clone()
    pairs = ([6, 0, 3, 3], [5, 1, 2, 0])
    expected[pairs[1]] = src[pairs[0]]
    index = BlockIndex(torch.device("cpu"), capacity=6)
    index.fill(*pairs)
    launch_copy_kernel(src, got, index, grid_pairs=4)
    assert torch.equal(got, expected)


def test_kernel_programs_past_the_count_copy_nothing(triton_interpreter):
    src, dst = rows(4, 16, 4), torch.zeros(4, 16, dtype=torch.uint8)
    index = BlockIndex(torch.device("cpu"), capacity=4)
    index.fill([1, 2, 3, 0], [0, 1, 2, 3])
    index.fill([3], [2])  # a shorter copy leaves the older ids behind the count
    launch_copy_kernel(src, dst, index, grid_pairs=4)  # as a graph of a larger bucket would
    assert torch.equal(dst[2], src[3])
    assert not dst[[0, 1, 3]].any()


def test_an_index_refuses_more_blocks_than_its_capacity():
    with pytest.raises(ValueError, match="more than"):
        BlockIndex(torch.device("cpu"), capacity=2).fill([1, 2, 3], [1, 2, 3])
    with pytest.raises(ValueError, match="more than"):
        BlockIndex(torch.device("cpu"), capacity=8).fill([1, 2, 3], [1, 2, 3], stride=2)


def test_an_index_with_a_bucket_stride_packs_the_ids_at_its_front(triton_interpreter):
    index = BlockIndex(torch.device("cpu"), capacity=16)
    index.fill([5, 6, 7], [1, 2, 3], stride=4)
    count, src_ids, dst_ids = index.views(stride=4)
    assert index.host[:9].tolist() == [3, 5, 6, 7, 0, 1, 2, 3, 0]  # 1 + 2 * 4 ids to upload
    assert (count.item(), src_ids[:3].tolist(), dst_ids[:3].tolist()) == (3, [5, 6, 7], [1, 2, 3])
    src, dst = rows(8, 24, 5), torch.zeros(4, 24, dtype=torch.uint8)
    launch_copy_kernel(src, dst, index, grid_pairs=4, stride=4)
    assert torch.equal(dst[[1, 2, 3]], src[[5, 6, 7]])
    assert not dst[0].any()


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(-2, 9), max_size=6),
    st.lists(st.integers(-2, 9), max_size=6),
)
def test_the_quick_pair_check_accepts_exactly_what_check_pairs_accepts(src_ids, dst_ids):
    try:
        check_pairs(src_ids, dst_ids, 8, 7)
        accepted = True
    except ValueError:
        accepted = False
    assert _pairs_fit(src_ids, dst_ids, 8, 7) == accepted


# -- the connector -----------------------------------------------------------------------


def config(role: str, **extra) -> KVTransferConfig:
    return KVTransferConfig.from_dict(
        {
            "kv_connector": "CudaIpcConnector",
            "kv_role": role,
            "kv_port": 0,
            "kv_connector_extra_config": {"transfer_timeout_s": 5.0, **extra},
        }
    )


@pytest.mark.parametrize("role", ["kv_producer", "kv_consumer", "kv_both"])
def test_the_factory_builds_a_cuda_ipc_connector_for_each_role(role, kv_spec):
    connector = create_connector(config(role), None, kv_spec)
    try:
        assert type(connector) is CudaIpcConnector
        assert isinstance(connector, TcpConnector)  # its fallback speaks TCP's protocol
    finally:
        connector.close()


@pytest.fixture
def same_process_producer(kv_spec):
    producer = create_connector(config("kv_producer"), None, kv_spec)
    cache = torch.zeros(kv_spec.kv_cache_shape(12))
    for b in range(1, 12):
        cache[b] = block_content(kv_spec, b)
    producer.register_kv_cache(cache)
    yield producer
    producer.close()


def test_a_pull_from_a_producer_in_this_process_copies_directly_and_releases_the_lease(
    same_process_producer, kv_spec
):
    consumer = make_consumer("CudaIpcConnector", kv_spec)
    try:
        rid = f"req-{uuid.uuid4().hex[:8]}"
        params = same_process_producer.export_blocks(rid, [2, 4, 6, 8], num_tokens=16)
        consumer.start_pull(rid, params, [9, 7, 5], [4, 6, 8])
        assert wait_pull(consumer, rid) is None
        cache = local_cache(consumer)
        for local_id, remote_id in [(9, 4), (7, 6), (5, 8)]:
            assert torch.equal(cache[local_id], block_content(kv_spec, remote_id))
        assert not cache[[0, 1, 2, 3, 4, 6, 8, 10]].any()
        assert consumer.stats()["num_direct_transfers"] == 1
        assert same_process_producer.stats()["bytes_served"] == 0  # nothing went over TCP
        records = consumer.take_transfer_records()
        assert [(r.request_id, r.num_bytes) for r in records] == [(rid, 3 * cache[0].numel() * 4)]
        wait_freed(same_process_producer, rid)
    finally:
        consumer.close()


def wait_freed(producer, request_id: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if request_id in producer.take_freed_requests():
            return
        time.sleep(0.01)
    raise AssertionError(f"the producer still holds {request_id!r}")


def test_a_peer_claiming_to_be_this_process_without_a_producer_here_gets_tcp(kv_spec):
    consumer = make_consumer("CudaIpcConnector", kv_spec)
    try:
        spoof = gpu_export(
            pid=os.getpid(), device="cpu", handle=b"", base_addr=local_cache(consumer).data_ptr()
        )
        reply = HandshakeReply(
            engine_id="spoof",
            instance_id=uuid.uuid4().hex,
            compat_hash=kv_spec.compat_hash(),
            kv_spec=kv_spec,
            num_blocks=16,
            block_len=1024,
            tp_size=1,
            connector="CudaIpcConnector",
            cuda_ipc=spoof.to_message(),
        )
        assert consumer._consumer._accept_engine(RemoteEngine(("127.0.0.1", 1), reply)) is None
    finally:
        consumer.close()


@pytest.mark.parametrize("producer_connector", ["CudaIpcConnector", "TcpConnector", "NixlConnector"])
def test_a_producer_in_another_process_on_cpu_is_pulled_over_tcp(producers, producer_connector, kv_spec):
    producer = producers.get(producer_connector)
    consumer = make_consumer("CudaIpcConnector", kv_spec)
    try:
        rid = f"req-{uuid.uuid4().hex[:8]}"
        params = producers.process.export(producer, rid, [3, 5, 7], num_tokens=12)
        consumer.start_pull(rid, params, [1, 2, 3], [3, 5, 7])
        assert wait_pull(consumer, rid) is None
        cache = local_cache(consumer)
        for local_id, remote_id in [(1, 3), (2, 5), (3, 7)]:
            assert torch.equal(cache[local_id], block_content(kv_spec, remote_id))
        assert consumer.stats()["num_direct_transfers"] == 0
        producers.process.wait_freed(producer, rid, timeout_s=5)
    finally:
        consumer.close()


def test_a_cuda_ipc_producer_serves_a_plain_tcp_consumer(producers, kv_spec):
    producer = producers.get("CudaIpcConnector")
    consumer = make_consumer("TcpConnector", kv_spec)
    try:
        rid = f"req-{uuid.uuid4().hex[:8]}"
        params = producers.process.export(producer, rid, [4], num_tokens=4)
        consumer.start_pull(rid, params, [6], [4])
        assert wait_pull(consumer, rid) is None
        assert torch.equal(local_cache(consumer)[6], block_content(kv_spec, 4))
    finally:
        consumer.close()
