"""CudaIpcConnector on a GPU: a producer process's cache mapped through CUDA IPC and pulled
with one kernel, and the copy kernel at Llama-3-8B block sizes."""

from __future__ import annotations

import uuid

import pytest
import torch
from kv_transfer_harness import ProducerProcess, block_content, local_cache, make_consumer, wait_pull

from kvtransfer.cuda_ipc_copy import GraphedBlockCopy, copy_blocks

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_a_pull_from_another_process_on_the_gpu_goes_through_cuda_ipc(kv_spec):
    process = ProducerProcess()
    consumer = make_consumer("CudaIpcConnector", kv_spec, device="cuda")
    try:
        producer, _ = process.create("CudaIpcConnector", kv_spec, 16, device="cuda")
        for _ in range(2):  # the second pull reuses the mapping
            rid = f"ipc-{uuid.uuid4().hex[:8]}"
            params = process.export(producer, rid, [2, 4, 6, 8], num_tokens=16)
            consumer.start_pull(rid, params, [9, 7, 5], [4, 6, 8])
            assert wait_pull(consumer, rid) is None
            process.wait_freed(producer, rid, timeout_s=5)
        cache = local_cache(consumer)
        for local_id, remote_id in [(9, 4), (7, 6), (5, 8)]:
            assert torch.equal(cache[local_id].cpu(), block_content(kv_spec, remote_id))
        assert not cache[[0, 1, 2, 3, 4, 6, 8]].any()
        stats = consumer.stats()
        assert stats["num_direct_transfers"] == 2
        assert stats["num_handshakes"] == 1
        assert process.stats(producer)["bytes_served"] == 0  # no block went over TCP
    finally:
        consumer.close()
        process.close()


def test_the_copy_kernel_moves_llama3_8b_blocks_exactly():
    block_len = 32 * 2 * 8 * 16 * 128 * 2  # 2 MiB
    src = torch.randint(0, 256, (40, block_len), dtype=torch.uint8, device="cuda")
    dst = torch.zeros((33, block_len), dtype=torch.uint8, device="cuda")
    src_ids = torch.randperm(40)[:32].tolist()
    dst_ids = torch.randperm(32).add(1).tolist()
    copy_blocks(src, dst, src_ids, dst_ids)
    torch.cuda.synchronize()
    assert torch.equal(dst[dst_ids], src[src_ids])
    assert not dst[0].any()


def test_graphed_copies_replay_correctly_for_several_sizes_and_sources():
    block_len = 64 * 1024
    sources = [torch.randint(0, 256, (20, block_len), dtype=torch.uint8, device="cuda") for _ in range(2)]
    dst = torch.zeros((24, block_len), dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    graphed = GraphedBlockCopy(dst, stream)
    for n in [3, 4, 3, 9, 1, 16, 9]:  # buckets reused with other counts, and a new one
        for src in sources:
            src_ids = torch.randperm(20)[:n].tolist()
            dst_ids = torch.randperm(23)[:n].add(1).tolist()
            dst.zero_()
            torch.cuda.synchronize()  # the zeroing ran on the default stream
            phases = {}
            graphed.copy(src, src_ids, dst_ids, phases)
            assert graphed.wait() > 0  # the copy's time on the GPU, from its events
            assert phases["packed"] <= phases["launched"]
            assert torch.equal(dst[dst_ids], src[src_ids])
            untouched = sorted(set(range(24)) - set(dst_ids))
            assert not dst[untouched].any()


def test_a_graphed_copy_refuses_ids_outside_either_cache_and_a_copy_not_waited_for():
    block_len = 4096
    src = torch.randint(0, 256, (8, block_len), dtype=torch.uint8, device="cuda")
    dst = torch.zeros((6, block_len), dtype=torch.uint8, device="cuda")
    graphed = GraphedBlockCopy(dst, torch.cuda.Stream())
    with pytest.raises(ValueError, match="source block ids \\[8\\]"):
        graphed.copy(src, [1, 8], [1, 2])
    with pytest.raises(ValueError, match="destination block ids \\[6\\]"):
        graphed.copy(src, [1, 2], [1, 6])
    with pytest.raises(ValueError, match="repeat"):
        graphed.copy(src, [1, 2], [3, 3])
    graphed.copy(src, [1, 2], [3, 4])
    with pytest.raises(RuntimeError, match="wait"):
        graphed.copy(src, [1, 2], [3, 4])
    graphed.wait()
    assert torch.equal(dst[[3, 4]], src[[1, 2]])
    assert not dst[[0, 1, 2, 5]].any()
