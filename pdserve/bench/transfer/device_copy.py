"""The GPU reference a transfer is measured against: a device-to-device copy of the same
bytes, timed on CUDA events and on host clocks; and the block-copy kernel alone, swept
over its tilings."""

from __future__ import annotations

import functools
import statistics
import time

import torch

from kvtransfer.kv_cache_spec import KVCacheSpec
from pdserve.bench.transfer.connector_pull import LLAMA3_8B, block_bytes_of


def device_copy_gb_per_s(num_bytes: int, repeats: int = 20) -> float:
    """Median bandwidth of one contiguous device-to-device copy of `num_bytes` (bytes copied
    per second, each byte counted once, as the transfers are)."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return num_bytes / statistics.median(times) / 1e9


def device_copy_host_gb_per_s(num_bytes: int, repeats: int = 20) -> float:
    """The same copy timed as a pull's "xfer" is, on host clocks: launch plus a wait for it
    (an event synchronize on the current stream), median of `repeats`."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    done = torch.cuda.Event()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        done.record()
        done.synchronize()
        times.append(time.perf_counter() - start)
    del src, dst
    torch.cuda.empty_cache()
    return num_bytes / statistics.median(times) / 1e9


def kernel_sweep(tokens: list[int], repeats: int = 20) -> None:
    """Time the gather-scatter kernel alone (CUDA events, in this process, with the GPU kept
    busy while the host launches it) at Llama-3-8B block shapes for several tilings, against
    copy_ of the same bytes."""
    from kvtransfer.cuda_ipc_copy import BlockIndex, launch_copy_kernel

    spec = KVCacheSpec("bench-llama3-8b", "bfloat16", **LLAMA3_8B)
    block_len = block_bytes_of(spec)
    print(
        f"{'tokens':>6s} {'chunk words':>11s} {'warps':>5s} {'kernel GB/s':>11s} {'copy GB/s':>9s} {'k/copy':>6s}"
    )
    for n in tokens:
        num_blocks = n // spec.block_size
        copy = device_copy_gb_per_s(num_blocks * block_len)
        src = torch.zeros(num_blocks + 1, block_len, dtype=torch.uint8, device="cuda")
        dst = torch.zeros_like(src)
        index = BlockIndex(dst.device, num_blocks + 1)
        ids = list(range(1, num_blocks + 1))
        index.fill(ids, ids[::-1])
        index.send()
        for chunk in (2048, 4096, 8192):
            for warps in (4, 8, 16):
                launch = functools.partial(
                    launch_copy_kernel, src, dst, index, num_blocks, max_chunk_words=chunk, num_warps=warps
                )
                launch()
                times = []
                for _ in range(repeats):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    torch.cuda._sleep(1_000_000)  # the GPU waits ~0.5 ms, so the launch's host time is hidden
                    start.record()
                    launch()
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end) / 1e3)
                gb_s = num_blocks * block_len / statistics.median(times) / 1e9
                print(
                    f"{n:6d} {chunk:11d} {warps:5d} {gb_s:11.1f} {copy:9.1f} {gb_s / copy:6.1%}", flush=True
                )
        del src, dst
        torch.cuda.empty_cache()
