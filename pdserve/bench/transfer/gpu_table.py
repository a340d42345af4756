"""`pdserve bench transfer --gpu-table`: each data path between two processes sharing a
GPU, at Llama-3-8B shapes, against a device copy of the same bytes; every row in a
process of its own (UCX reads its environment once), then one table.

On one GPU NixlConnector pulls by the same direct copy as CudaIpcConnector unless its
same_host_copy is off; the rows say which route they expect, and a row whose pulls took
another one fails, naming the route its pulls took (its log holds the consumer's reason)."""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvtransfer.kv_cache_spec import KVCacheSpec
from pdserve.bench.transfer.connector_pull import LLAMA3_8B, bench_transfer, block_bytes_of
from pdserve.bench.transfer.device_copy import device_copy_gb_per_s, device_copy_host_gb_per_s
from pdserve.bench.transfer.nixl_raw import bench_nixl_raw

ROW_TIMEOUT_S = 50.0  # bounds --gpu-table at about ten minutes
UCX_FAST_TLS = "cuda_ipc,cuda_copy,tcp"


# the phases of a direct-copy pull (CudaIpcConnector; NixlConnector on one machine, which
# stamps from "started" on), as (name, from stamp, to stamp), in order
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


@dataclass
class GpuRow:
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
    # connectors only: True, every pull must take the direct copy; False, none may
    expect_direct: bool | None = None


GET_ZCOPY_ON = {"UCX_CUDA_IPC_ENABLE_GET_ZCOPY": "y"}
READS = {"same_host_copy": "off"}  # NixlConnector by NIXL READ even on one machine


def gpu_rows() -> list[GpuRow]:
    fast = {"UCX_TLS": UCX_FAST_TLS}
    slow = 8192
    direct = {"expect_direct": True, "pulls": 10}
    return [
        GpuRow("CudaIpcConnector", "CudaIpcConnector", **direct),
        GpuRow(
            "CudaIpcConnector, launch without CUDA graph",
            "CudaIpcConnector",
            {"PDSERVE_KV_COPY_GRAPHS": "0"},
            **direct,
        ),
        GpuRow(
            "CudaIpcConnector, caller sleeps 50 us per poll",
            "CudaIpcConnector",
            poll_sleep_s=50e-6,
            **direct,
        ),
        GpuRow(
            "CudaIpcConnector, graph launch and events through torch",
            "CudaIpcConnector",
            {"PDSERVE_KV_COPY_DRIVER": "0"},
            **direct,
        ),
        GpuRow(
            "CudaIpcConnector, blocking event wait",
            "CudaIpcConnector",
            {"PDSERVE_KV_COPY_WAIT": "block"},
            **direct,
        ),
        GpuRow("NixlConnector", "NixlConnector", **direct),  # same_host_copy auto: the direct copy
        # UCX serves a GET over cuda_ipc only where it finds NVLink unless this is on (its
        # uct_cuda_ipc_iface_get_max_get_zcopy): a one-GPU host has none, so reads go by TCP
        GpuRow(
            "NixlConnector, same_host_copy off",
            "NixlConnector",
            {**fast, **GET_ZCOPY_ON},
            READS,
            expect_direct=False,
            pulls=5,
        ),
        # the same with NIXL's progress thread: whether the READ waits on the I/O thread's
        # 1 ms checks to make progress
        GpuRow(
            "NixlConnector, same_host_copy off, cuda_ipc GET on + progress thread",
            "NixlConnector",
            {**fast, **GET_ZCOPY_ON},
            {**READS, "enable_prog_thread": True},
            expect_direct=False,
            pulls=5,
        ),
        GpuRow(
            "NixlConnector, same_host_copy off, UCX defaults + cuda_ipc GET on",
            "NixlConnector",
            GET_ZCOPY_ON,
            READS,
            expect_direct=False,
            pulls=5,
        ),
        GpuRow(
            "NixlConnector, same_host_copy off, UCX defaults",
            "NixlConnector",
            extra=READS,
            expect_direct=False,
            max_tokens=slow,
            pulls=3,
        ),
        GpuRow(
            f"NixlConnector, same_host_copy off, UCX_TLS={UCX_FAST_TLS}",
            "NixlConnector",
            fast,
            READS,
            expect_direct=False,
            max_tokens=slow,
            pulls=3,
        ),
        GpuRow(
            "NixlConnector, same_host_copy off, same TLS + progress thread",
            "NixlConnector",
            fast,
            {**READS, "enable_prog_thread": True},
            expect_direct=False,
            max_tokens=slow,
            pulls=3,
        ),
        GpuRow("raw NIXL READ, 1 desc/block, cuda_ipc GET on", "nixl-raw", {**fast, **GET_ZCOPY_ON}, pulls=5),
        GpuRow("raw NIXL READ, 1 desc/block", "nixl-raw", fast, max_tokens=slow, pulls=3),
        GpuRow(
            "raw NIXL READ, 1 desc/layer/block", "nixl-raw", fast, per_layer=True, max_tokens=slow, pulls=3
        ),
        GpuRow("raw NIXL WRITE, 1 desc/block", "nixl-raw", fast, op="WRITE", max_tokens=slow, pulls=3),
        GpuRow(
            "raw NIXL WRITE, 1 desc/layer/block",
            "nixl-raw",
            fast,
            op="WRITE",
            per_layer=True,
            max_tokens=slow,
            pulls=3,
        ),
        GpuRow(
            "raw NIXL WRITE, 1 desc/block, UCX defaults", "nixl-raw", op="WRITE", max_tokens=slow, pulls=3
        ),
    ]


def run_row(row: GpuRow, tokens: list[int]) -> list[dict[str, Any]]:
    """Measure `row` at each request size, with the device copy of the same bytes first."""
    spec = KVCacheSpec("bench-llama3-8b", "bfloat16", **LLAMA3_8B)
    # the consumer's line saying which path its pulls take, and why, into the row's log
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("kvtransfer.direct_copy").setLevel(logging.INFO)
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
            check_route(row, result.stats)
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
                "direct_transfers": result.stats.get("num_direct_transfers"),
            }
        )
        print(json.dumps({"row": row.label, **results[-1]}), flush=True)
    return results


def check_route(row: GpuRow, stats: dict[str, float]) -> None:
    """RuntimeError unless the row's pulls (its timed ones and the first) took the route it
    expects, by the consumer's num_direct_transfers."""
    if row.expect_direct is None:
        return
    direct, pulls = int(stats.get("num_direct_transfers", 0)), row.pulls + 1
    wanted = pulls if row.expect_direct else 0
    if direct != wanted:
        raise RuntimeError(
            f"{row.label}: {direct} of {pulls} pulls took the direct copy, expected {wanted}; "
            "the consumer logged why (the line 'pulls from engine ...' in this row's log)"
        )


def label_matches(label: str, word: str) -> bool:
    """--only's test: `word` inside the label, or, ending in "$", the whole label."""
    return label == word[:-1] if word.endswith("$") else word in label


def gpu_table(tokens: list[int], out: Path, only: list[str] | None = None) -> None:
    """Run every row in its own process (with its environment), logging under `out`, then
    print the table."""
    out.mkdir(parents=True, exist_ok=True)
    table = []
    for i, row in enumerate(gpu_rows()):
        if only and not any(label_matches(row.label, word) for word in only):
            continue
        log = out / f"row{i:02d}.log"
        env = {**os.environ, **row.env, "UCX_PROTO_INFO": "y"}
        command = [
            sys.executable,
            "-m",
            "pdserve",
            "bench",
            "transfer",
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
    launch plus wait (x/copyh); "direct" counts the pulls (the first, untimed, included) that
    took the direct copy. Then each direct-copy pull's phases."""
    width = max([52] + [len(label) for label, _, _ in table])
    print()
    print(
        f"{'path':{width}s} {'direct':>6s} {'tokens':>6s} {'MiB':>6s} {'copy GB/s':>9s} {'xfer GB/s':>9s} {'x/copy':>6s} "
        f"{'wall GB/s':>9s} {'w/copy':>6s} {'kernel GB/s':>11s} {'k/copy':>6s} {'copyh GB/s':>10s} "
        f"{'x/copyh':>7s}"
    )
    for label, m, status in table:
        if m is None:
            print(f"{label:{width}s} failed: {status} (see its log)")
            continue
        kernel = m.get("kernel_gb_s")
        copy_host = m.get("copy_host_gb_s")
        direct = m.get("direct_transfers")
        print(
            f"{label:{width}s} {'' if direct is None else direct:>6} {m['tokens']:6d} {m['mib']:6.0f} {m['copy_gb_s']:9.1f} {m['xfer_gb_s']:9.1f} "
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
    print(f"{'path':{width}s} {'tokens':>6s} " + " ".join(f"{name:>8s}" for name in names))
    for label, m in phased:
        phases = m["phases_us"]
        cells = " ".join(f"{phases[name]:8.1f}" if name in phases else f"{'':8s}" for name in names)
        print(f"{label:{width}s} {m['tokens']:6d} {cells}")
