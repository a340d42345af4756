"""KV-transfer throughput between two processes: a producer process exports blocks, this
process pulls them through a connector, and the bytes per second of the pulls are printed.

    python -m pdserve.bench.transfer --connectors TcpConnector NixlConnector --mib 256

A block has the default model's geometry (SmolLM2-135M in bfloat16: 30 layers, 3 KV
heads, head size 64, 16 tokens: 360 KiB) unless the flags say otherwise. A first pull
does the handshake and is not timed; every timed pull moves all blocks of one request,
from start_pull() until poll() reports it, and the last one is checked byte for byte.

On a GPU, `--gpu-table` compares the data paths between two processes sharing the
device, at Llama-3-8B shapes (32 layers, 8 KV heads, head size 128, bf16, 16-token
blocks: 2 MiB a block, 256 MiB for a 2048-token request), against a device-to-device
copy of the same bytes timed in the same process:

    python -m pdserve.bench.transfer --gpu-table --tokens 2048 8192 --out logs/

Each row runs in a process of its own (UCX reads its environment once): CudaIpcConnector,
NixlConnector under several UCX_TLS settings and with NIXL's progress thread, and raw
NIXL transfers with one descriptor per block or one per layer of a block, READ and
WRITE. "xfer" is the connector's own transfer time (TransferRecord: from the start of
the data movement to its end); "wall" adds the caller's view (start_pull() until poll()
reports it, handshake excluded). Two like-for-like ratios sit beside them: "kernel" is
CudaIpcConnector's copy on CUDA events (ids upload and kernel) against copy_ on CUDA
events, and "copyh" is copy_ timed as xfer is, on host clocks (launch, then wait for its
event). A second table gives the median microseconds of each phase of a CudaIpcConnector
pull (TransferRecord.phases_ns). Logs of every row go under --out.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.config.kv_transfer_config import KVTransferConfig
from kvtransfer.factory import create_connector
from kvtransfer.kv_cache_spec import KVCacheSpec

REPLY_TIMEOUT_S = 120.0
ROW_TIMEOUT_S = 50.0  # bounds --gpu-table at about ten minutes
LLAMA3_8B = {"num_layers": 32, "num_kv_heads": 8, "head_size": 128, "block_size": 16}
UCX_FAST_TLS = "cuda_ipc,cuda_copy,tcp"


@dataclass
class TransferBenchResult:
    connector: str
    device: str
    num_blocks: int
    block_bytes: int
    seconds: list[float]  # one per timed pull, start_pull() to poll() reporting it
    xfer_seconds: list[float] = field(default_factory=list)  # the connector's own transfer times
    # per timed pull, the connector's phase stamps (TransferRecord.phases_ns) plus "polled":
    # when the caller's poll() reported it; empty where the connector records none
    phases: list[dict[str, int]] = field(default_factory=list)

    @property
    def num_bytes(self) -> int:
        return self.num_blocks * self.block_bytes

    @property
    def median_gb_per_s(self) -> float:
        return self.num_bytes / statistics.median(self.seconds) / 1e9

    @property
    def best_gb_per_s(self) -> float:
        return self.num_bytes / min(self.seconds) / 1e9

    @property
    def median_xfer_gb_per_s(self) -> float:
        return self.num_bytes / statistics.median(self.xfer_seconds) / 1e9 if self.xfer_seconds else 0.0

    def summary(self) -> str:
        return (
            f"{self.connector:14s} {self.device:5s} {self.num_bytes / 2**20:8.1f} MiB in {self.num_blocks} blocks of "
            f"{self.block_bytes / 1024:.0f} KiB: median {statistics.median(self.seconds) * 1e3:8.2f} ms "
            f"= {self.median_gb_per_s:6.2f} GB/s (best {self.best_gb_per_s:.2f} GB/s, {len(self.seconds)} pulls)"
        )


def _fill_value(block_id: int) -> int:
    return block_id % 251


def _filled_cache(kv_spec: KVCacheSpec, num_blocks: int, device: str) -> torch.Tensor:
    """A cache whose block b holds bytes equal to b % 251."""
    cache = torch.empty(kv_spec.kv_cache_shape(num_blocks), dtype=torch.bfloat16, device=device)
    values = torch.tensor([_fill_value(b) for b in range(num_blocks)], dtype=torch.uint8, device=device)
    cache.view(torch.uint8).view(num_blocks, -1).copy_(values[:, None].expand(num_blocks, -1))
    return cache


def _producer_main(
    pipe: Any, connector: str, spec: dict[str, Any], num_blocks: int, device: str, extra: dict[str, Any]
) -> None:
    kv_spec = KVCacheSpec(**spec)
    config = KVTransferConfig.from_dict(
        {
            "kv_connector": connector,
            "kv_role": "kv_producer",
            "kv_port": 0,
            "kv_connector_extra_config": extra,
        }
    )
    producer = create_connector(config, "kv_producer", kv_spec)
    producer.register_kv_cache(_filled_cache(kv_spec, num_blocks, device))
    pipe.send("ready")
    while True:
        command = pipe.recv()
        if command is None:
            break
        request_id, block_ids = command
        pipe.send(producer.export_blocks(request_id, block_ids, len(block_ids) * kv_spec.block_size))
    producer.close()


def default_spec() -> KVCacheSpec:
    return KVCacheSpec("bench", "bfloat16", num_kv_heads=3, head_size=64, num_layers=30, block_size=16)


def block_bytes_of(spec: KVCacheSpec) -> int:
    return spec.num_layers * 2 * spec.num_kv_heads * spec.block_size * spec.head_size * 2


def bench_transfer(
    connector: str,
    *,
    mib: float = 256,
    spec: KVCacheSpec | None = None,
    pulls: int = 5,
    device: str = "cpu",
    extra: dict[str, Any] | None = None,
    poll_sleep_s: float = 0.0,
) -> TransferBenchResult:
    """Time `pulls` pulls of about `mib` MiB each from a producer process through `connector`;
    between polls the caller sleeps `poll_sleep_s` (0: it only yields, a busy poll)."""
    spec = spec or default_spec()
    extra = extra or {}
    block_bytes = block_bytes_of(spec)
    num_blocks = max(1, round(mib * 2**20 / block_bytes))
    cache_blocks = num_blocks + 1  # block 0 is the null block on both sides

    context = multiprocessing.get_context("spawn")
    pipe, child_pipe = context.Pipe()
    process = context.Process(
        target=_producer_main,
        args=(child_pipe, connector, spec.to_dict(), cache_blocks, device, extra),
        daemon=True,
    )
    process.start()
    config = KVTransferConfig.from_dict(
        {
            "kv_connector": connector,
            "kv_role": "kv_consumer",
            "kv_connector_extra_config": {"transfer_timeout_s": 120, **extra},
        }
    )
    consumer = create_connector(config, "kv_consumer", spec)
    cache = torch.zeros(spec.kv_cache_shape(cache_blocks), dtype=torch.bfloat16, device=device)
    consumer.register_kv_cache(cache)
    try:
        _expect(pipe, "ready", process)
        remote_ids = list(range(1, cache_blocks))
        local_ids = remote_ids[::-1]  # a different block for each, to catch misplaced copies
        seconds, xfer_seconds, phases = [], [], []
        for i in range(pulls + 1):
            pipe.send((f"bench-{i}", remote_ids))
            params = _expect(pipe, process=process)
            consumer.take_transfer_records()
            start = time.perf_counter()
            consumer.start_pull(f"bench-{i}", params, local_ids, remote_ids)
            while True:  # a busy poll: the fastest pulls take a fraction of a millisecond
                done, failed = consumer.poll()
                if failed:
                    raise RuntimeError(f"{connector} pull failed: {failed[0][1]}")
                if done:
                    break
                time.sleep(poll_sleep_s)
            polled = time.perf_counter_ns()
            if i > 0:  # the first pull includes the handshake
                seconds.append(time.perf_counter() - start)
                records = consumer.take_transfer_records()
                xfer_seconds.extend(r.seconds for r in records)
                phases.extend({**r.phases_ns, "polled": polled} for r in records if r.phases_ns)
        _check(cache, local_ids, remote_ids)
    finally:
        consumer.close()
        pipe.send(None)
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
    return TransferBenchResult(connector, device, num_blocks, block_bytes, seconds, xfer_seconds, phases)


def _expect(pipe: Any, wanted: Any = ..., process: Any = None) -> Any:
    deadline = time.monotonic() + REPLY_TIMEOUT_S
    while not pipe.poll(1.0):
        if process is not None and not process.is_alive():
            raise RuntimeError(f"the producer process died (exit code {process.exitcode}); see its log")
        if time.monotonic() > deadline:
            raise RuntimeError("the producer process did not answer")
    reply = pipe.recv()
    if wanted is not ... and reply != wanted:
        raise RuntimeError(f"the producer process answered {reply!r}")
    return reply


def _check(cache: torch.Tensor, local_ids: list[int], remote_ids: list[int]) -> None:
    as_bytes = cache.view(torch.uint8).view(cache.shape[0], -1)
    expected = torch.tensor([_fill_value(r) for r in remote_ids], dtype=torch.uint8, device=cache.device)
    got = as_bytes[local_ids]
    if not bool((got == expected[:, None]).all()):
        raise RuntimeError("the pulled blocks differ from the producer's")


# -- the device-to-device reference --------------------------------------------------------


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


# the phases of a CudaIpcConnector pull, as (name, from stamp, to stamp), in order
PHASES = [
    ("handoff", "dispatched", "dequeued"),  # start_pull() to the I/O thread running the pull
    ("begin", "dequeued", "started"),  # lease and id checks, engine lookup
    ("pack", "started", "packed"),  # ids checked and written to the pinned buffer
    ("launch", "packed", "launched"),  # graph replay (ids H2D + kernel) enqueued
    ("wait", "launched", "gpu_done"),  # until the I/O thread sees the copy's event complete
    ("finish", "gpu_done", "recorded"),  # bookkeeping before the record is written
    ("poll", "recorded", "polled"),  # until the caller's poll() reports it
]


def phase_medians_us(phases: list[dict[str, int]]) -> dict[str, float]:
    """Median microseconds of each phase over the pulls that stamped both its ends, plus
    "gpu" (the copy's CUDA-event time) and "xfer" (started to recorded)."""
    spans = {name: (a, b) for name, a, b in PHASES}
    spans["xfer"] = ("started", "recorded")
    medians = {}
    for name, (a, b) in spans.items():
        values = [(p[b] - p[a]) / 1e3 for p in phases if a in p and b in p]
        if values:
            medians[name] = statistics.median(values)
    gpu = [p["gpu_ns"] / 1e3 for p in phases if "gpu_ns" in p]
    if gpu:
        medians["gpu"] = statistics.median(gpu)
    return medians


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


# -- raw NIXL: descriptor granularity and direction -------------------------------------------


def _nixl_raw_target(pipe: Any, spec: dict[str, Any], num_blocks: int, progress_thread: bool) -> None:
    """The passive side of a raw NIXL transfer: registers its cache, answers with its agent's
    metadata and base address, and drives its progress until told to stop."""
    from kvtransfer.nixl_connector import import_nixl_api

    api = import_nixl_api()
    kv_spec = KVCacheSpec(**spec)
    agent = api.nixl_agent(
        "bench-target", api.nixl_agent_config(enable_prog_thread=progress_thread, backends=["UCX"])
    )
    cache = _filled_cache(kv_spec, num_blocks, "cuda")
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
        _filled_cache(spec, cache_blocks, "cuda")
        if op == "WRITE"
        else torch.zeros(spec.kv_cache_shape(cache_blocks), dtype=torch.bfloat16, device="cuda")
    )
    registered = agent.register_memory(cache)
    try:
        metadata, remote_base, remote_device = _expect(pipe, process=process)
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
            _check(cache, ids, ids)
    finally:
        agent.deregister_memory(registered)
        pipe.send(None)
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
    label = f"nixl-raw {op} {'layer' if per_layer else 'block'} desc"
    return TransferBenchResult(label, "cuda", num_blocks, block_len, seconds, list(seconds))


# -- the GPU table ----------------------------------------------------------------------------


@dataclass
class Row:
    """One configuration of the GPU table, run in a process of its own."""

    label: str
    kind: str  # a connector name, or "nixl-raw"
    env: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # kv_connector_extra_config
    op: str = "READ"  # nixl-raw only
    per_layer: bool = False  # nixl-raw only
    progress_thread: bool = False  # nixl-raw only
    max_tokens: int | None = None  # slow paths skip the largest requests
    pulls: int = 5
    poll_sleep_s: float = 0.0  # the caller's sleep between polls (0: a busy poll)


def gpu_rows() -> list[Row]:
    fast = {"UCX_TLS": UCX_FAST_TLS}
    slow = 8192
    return [
        Row("CudaIpcConnector", "CudaIpcConnector", pulls=10),
        Row(
            "CudaIpcConnector, launch without CUDA graph",
            "CudaIpcConnector",
            {"PDSERVE_KV_COPY_GRAPHS": "0"},
            pulls=10,
        ),
        Row(
            "CudaIpcConnector, caller sleeps 50 us per poll", "CudaIpcConnector", pulls=10, poll_sleep_s=50e-6
        ),
        Row(
            "CudaIpcConnector, graph launch and events through torch",
            "CudaIpcConnector",
            {"PDSERVE_KV_COPY_DRIVER": "0"},
            pulls=10,
        ),
        Row(
            "CudaIpcConnector, blocking event wait",
            "CudaIpcConnector",
            {"PDSERVE_KV_COPY_WAIT": "block"},
            pulls=10,
        ),
        Row("NixlConnector, UCX defaults", "NixlConnector", max_tokens=slow, pulls=3),
        Row(f"NixlConnector, UCX_TLS={UCX_FAST_TLS}", "NixlConnector", fast, max_tokens=slow, pulls=3),
        Row(
            "NixlConnector, same + progress thread",
            "NixlConnector",
            fast,
            {"enable_prog_thread": True},
            max_tokens=slow,
            pulls=3,
        ),
        Row("raw NIXL READ, 1 desc/block", "nixl-raw", fast, max_tokens=slow, pulls=3),
        Row("raw NIXL READ, 1 desc/layer/block", "nixl-raw", fast, per_layer=True, max_tokens=slow, pulls=3),
        Row("raw NIXL WRITE, 1 desc/block", "nixl-raw", fast, op="WRITE", max_tokens=slow, pulls=3),
        Row(
            "raw NIXL WRITE, 1 desc/layer/block",
            "nixl-raw",
            fast,
            op="WRITE",
            per_layer=True,
            max_tokens=slow,
            pulls=3,
        ),
        Row("raw NIXL WRITE, 1 desc/block, UCX defaults", "nixl-raw", op="WRITE", max_tokens=slow, pulls=3),
    ]


def run_row(row: Row, tokens: list[int]) -> list[dict[str, Any]]:
    """Measure `row` at each request size, with the device copy of the same bytes first."""
    spec = KVCacheSpec("bench-llama3-8b", "bfloat16", **LLAMA3_8B)
    results = []
    for n in tokens:
        if row.max_tokens is not None and n > row.max_tokens:
            continue
        num_blocks = n // spec.block_size
        num_bytes = num_blocks * block_bytes_of(spec)
        copy = device_copy_gb_per_s(num_bytes)
        copy_host = device_copy_host_gb_per_s(num_bytes)
        if row.kind == "nixl-raw":
            result = bench_nixl_raw(
                spec,
                num_blocks,
                op=row.op,
                per_layer=row.per_layer,
                progress_thread=row.progress_thread,
                pulls=row.pulls,
            )
        else:
            result = bench_transfer(
                row.kind,
                mib=num_bytes / 2**20,
                spec=spec,
                pulls=row.pulls,
                device="cuda",
                extra=row.extra,
                poll_sleep_s=row.poll_sleep_s,
            )
        phases_us = phase_medians_us(result.phases)
        results.append(
            {
                "tokens": n,
                "mib": num_bytes / 2**20,
                "copy_gb_s": copy,
                "copy_host_gb_s": copy_host,
                "kernel_gb_s": num_bytes / phases_us["gpu"] / 1e3 if "gpu" in phases_us else None,
                "xfer_gb_s": result.median_xfer_gb_per_s,
                "wall_gb_s": result.median_gb_per_s,
                "phases_us": phases_us,
            }
        )
        print(json.dumps({"row": row.label, **results[-1]}), flush=True)
    return results


def gpu_table(tokens: list[int], out: Path, only: list[str] | None = None) -> None:
    """Run every row in its own process (with its environment), logging under `out`, then
    print the table."""
    out.mkdir(parents=True, exist_ok=True)
    table = []
    for i, row in enumerate(gpu_rows()):
        if only and not any(word in row.label for word in only):
            continue
        log = out / f"row{i:02d}.log"
        env = {**os.environ, **row.env, "UCX_PROTO_INFO": "y"}
        command = [
            sys.executable,
            "-m",
            "pdserve.bench.transfer",
            "--one-row",
            json.dumps(asdict(row)),
            "--tokens",
            *map(str, tokens),
        ]
        started = time.monotonic()
        with open(log, "w") as f:
            try:
                proc = subprocess.run(
                    command, env=env, stdout=subprocess.PIPE, stderr=f, text=True, timeout=ROW_TIMEOUT_S
                )
                stdout, status = proc.stdout, f"exit {proc.returncode}"
            except subprocess.TimeoutExpired as e:
                stdout, status = (
                    (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""),
                    f"timed out after {ROW_TIMEOUT_S:.0f} s",
                )
            f.write(f"\n--- stdout ---\n{stdout}\n--- {status} in {time.monotonic() - started:.1f} s ---\n")
        measured = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
        if not measured:
            table.append((row.label, None, status))
        for m in measured:
            table.append((row.label, m, status))
        print(f"[{i}] {row.label}: {status}, {len(measured)} sizes", flush=True)
    print_table(table)


def print_table(table: list[tuple[str, dict[str, Any] | None, str]]) -> None:
    """Today's columns (copy_ on CUDA events against the connector's host-timed xfer and the
    caller's wall time), then two like-for-like ratios: the copy kernel on CUDA events against
    copy_ on CUDA events (k/copy), and xfer against copy_ timed on host clocks as a pull is,
    launch plus wait (x/copyh); then each CudaIpcConnector pull's phases."""
    print()
    print(
        f"{'path':52s} {'tokens':>6s} {'MiB':>6s} {'copy GB/s':>9s} {'xfer GB/s':>9s} {'x/copy':>6s} "
        f"{'wall GB/s':>9s} {'w/copy':>6s} {'kernel GB/s':>11s} {'k/copy':>6s} {'copyh GB/s':>10s} "
        f"{'x/copyh':>7s}"
    )
    for label, m, status in table:
        if m is None:
            print(f"{label:52s} failed: {status} (see its log)")
            continue
        kernel = m.get("kernel_gb_s")
        copy_host = m.get("copy_host_gb_s")
        print(
            f"{label:52s} {m['tokens']:6d} {m['mib']:6.0f} {m['copy_gb_s']:9.1f} {m['xfer_gb_s']:9.1f} "
            f"{m['xfer_gb_s'] / m['copy_gb_s']:6.1%} {m['wall_gb_s']:9.1f} {m['wall_gb_s'] / m['copy_gb_s']:6.1%} "
            + (f"{kernel:11.1f} {kernel / m['copy_gb_s']:6.1%} " if kernel else f"{'':11s} {'':6s} ")
            + (f"{copy_host:10.1f} {m['xfer_gb_s'] / copy_host:7.1%}" if copy_host else "")
        )
    phased = [(label, m) for label, m, _ in table if m is not None and m.get("phases_us")]
    if not phased:
        return
    names = [name for name, _, _ in PHASES] + ["gpu", "xfer"]
    print()
    print("median microseconds per phase of a pull (host perf_counter; gpu: CUDA events around the copy)")
    print(f"{'path':52s} {'tokens':>6s} " + " ".join(f"{name:>8s}" for name in names))
    for label, m in phased:
        phases = m["phases_us"]
        cells = " ".join(f"{phases[name]:8.1f}" if name in phases else f"{'':8s}" for name in names)
        print(f"{label:52s} {m['tokens']:6d} {cells}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--connectors",
        nargs="+",
        default=["TcpConnector", "NixlConnector"],
        help="connectors to measure (default: TcpConnector NixlConnector)",
    )
    parser.add_argument("--mib", type=float, default=256, help="MiB per pull (default 256)")
    parser.add_argument("--pulls", type=int, default=5, help="timed pulls per connector (default 5)")
    parser.add_argument("--device", default="cpu", help="where both KV caches live: cpu or cuda")
    parser.add_argument("--num-layers", type=int, default=30, help="layers of the bench model (default 30)")
    parser.add_argument("--num-kv-heads", type=int, default=3, help="KV heads of the bench model (default 3)")
    parser.add_argument("--head-size", type=int, default=64, help="head size of the bench model (default 64)")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per block (default 16)")
    parser.add_argument(
        "--gpu-table",
        action="store_true",
        help="compare the GPU data paths at Llama-3-8B shapes against a device copy",
    )
    parser.add_argument(
        "--tokens",
        type=int,
        nargs="+",
        default=[2048, 8192, 32768],
        help="request sizes in tokens for --gpu-table (default 2048 8192 32768)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("bench-transfer-logs"),
        help="folder for the logs of --gpu-table's rows (default bench-transfer-logs)",
    )
    parser.add_argument(
        "--only", nargs="+", help="with --gpu-table: only rows whose label contains one of these"
    )
    parser.add_argument(
        "--kernel-sweep",
        action="store_true",
        help="time the block-copy kernel alone for several tilings at --tokens (CUDA events)",
    )
    parser.add_argument("--one-row", help=argparse.SUPPRESS)  # a row of --gpu-table, run by it
    args = parser.parse_args(argv)
    if args.one_row:
        run_row(Row(**json.loads(args.one_row)), args.tokens)
        return
    if args.kernel_sweep:
        kernel_sweep(args.tokens)
        return
    if args.gpu_table:
        gpu_table(args.tokens, args.out, args.only)
        return
    spec = KVCacheSpec(
        "bench", "bfloat16", args.num_kv_heads, args.head_size, args.num_layers, args.block_size
    )
    for connector in args.connectors:
        result = bench_transfer(connector, mib=args.mib, spec=spec, pulls=args.pulls, device=args.device)
        print(result.summary(), flush=True)


if __name__ == "__main__":
    main()
