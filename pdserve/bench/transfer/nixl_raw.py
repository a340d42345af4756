"""Raw NIXL transfers between two processes' GPU caches, below the connector: one
descriptor per block or one per layer of a block, READ or WRITE."""

from __future__ import annotations

import multiprocessing
import time
from typing import Any

import torch

from kvtransfer.kv_cache_spec import KVCacheSpec
from pdserve.bench.transfer.connector_pull import (
    TransferBenchResult,
    block_bytes_of,
    check_blocks,
    expect_reply,
    filled_cache,
)


def _nixl_raw_target(pipe: Any, spec: dict[str, Any], num_blocks: int, progress_thread: bool) -> None:
    """The passive side of a raw NIXL transfer: registers its cache, answers with its agent's
    metadata and base address, and drives its progress until told to stop."""
    from kvtransfer.nixl_connector import import_nixl_api

    api = import_nixl_api()
    kv_spec = KVCacheSpec(**spec)
    agent = api.nixl_agent(
        "bench-target", api.nixl_agent_config(enable_prog_thread=progress_thread, backends=["UCX"])
    )
    cache = filled_cache(kv_spec, num_blocks, "cuda")
    agent.register_memory(cache)
    pipe.send((agent.get_agent_metadata(), cache.data_ptr(), cache.device.index or 0))
    while not pipe.poll(0.0005):
        agent.get_new_notifs()
    pipe.recv()


def _nixl_rows(base: int, device: int, block_ids: list[int], block_len: int, parts: int) -> Any:
    import numpy as np

    part_len = block_len // parts
    rows = np.empty((len(block_ids) * parts, 3), dtype=np.uint64)
    starts = (
        np.array(block_ids, dtype=np.uint64)[:, None] * block_len
        + np.arange(parts, dtype=np.uint64) * part_len
    )
    rows[:, 0] = base + starts.reshape(-1)
    rows[:, 1] = part_len
    rows[:, 2] = device
    return rows


def bench_nixl_raw(
    spec: KVCacheSpec, num_blocks: int, *, op: str, per_layer: bool, progress_thread: bool, pulls: int
) -> TransferBenchResult:
    """Time NIXL transfers of `num_blocks` blocks between two processes' GPU caches, with
    one descriptor per block or one per layer of a block; READ pulls from the other
    process, WRITE pushes into it."""
    from kvtransfer.nixl_connector import import_nixl_api

    api = import_nixl_api()
    block_len = block_bytes_of(spec)
    cache_blocks = num_blocks + 1
    context = multiprocessing.get_context("spawn")
    pipe, child_pipe = context.Pipe()
    process = context.Process(
        target=_nixl_raw_target, args=(child_pipe, spec.to_dict(), cache_blocks, progress_thread), daemon=True
    )
    process.start()
    agent = api.nixl_agent(
        "bench-initiator", api.nixl_agent_config(enable_prog_thread=progress_thread, backends=["UCX"])
    )
    cache = (
        filled_cache(spec, cache_blocks, "cuda")
        if op == "WRITE"
        else torch.zeros(spec.kv_cache_shape(cache_blocks), dtype=torch.bfloat16, device="cuda")
    )
    registered = agent.register_memory(cache)
    try:
        metadata, remote_base, remote_device = expect_reply(pipe, process=process)
        remote_name = agent.add_remote_agent(metadata)
        parts = spec.num_layers if per_layer else 1
        ids = list(range(1, cache_blocks))
        local = agent.prep_xfer_dlist(
            "NIXL_INIT_AGENT",
            _nixl_rows(cache.data_ptr(), cache.device.index or 0, ids, block_len, parts),
            "VRAM",
        )
        remote = agent.prep_xfer_dlist(
            remote_name, _nixl_rows(remote_base, remote_device, ids, block_len, parts), "VRAM"
        )
        indices = list(range(len(ids) * parts))
        seconds = []
        for i in range(pulls + 1):
            handle = agent.make_prepped_xfer(op, local, indices, remote, indices, f"raw-{i}".encode())
            start = time.perf_counter()
            if agent.transfer(handle) == "ERR":
                raise RuntimeError(f"NIXL could not post the {op}")
            while (state := agent.check_xfer_state(handle)) == "PROC":
                pass
            if state != "DONE":
                raise RuntimeError(f"the NIXL {op} failed")
            if i > 0:
                seconds.append(time.perf_counter() - start)
            handle.release()
        if op == "READ":
            check_blocks(cache, ids, ids)
    finally:
        agent.deregister_memory(registered)
        pipe.send(None)
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
    label = f"nixl-raw {op} {'layer' if per_layer else 'block'} desc"
    return TransferBenchResult(label, "cuda", num_blocks, block_len, seconds, list(seconds))
