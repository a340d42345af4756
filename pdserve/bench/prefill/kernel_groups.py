"""`pdserve bench prefill --profile`: where one prefill's time goes. torch.profiler records
it; its kernels (on CPU: its operators' own time) are grouped into matmul, attention,
norm+rope+act and other, and the top ones listed with their share of the prefill's wall
time (what no kernel covers is the host's: scheduling, packing, launches, sampling). On
CPU the torch attention reference multiplies with aten::bmm, which lands in matmul."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from pdserve.bench.table import format_table

GROUPS = ("matmul", "attention", "norm+rope+act", "other")

# Substrings of kernel (or CPU operator) names, lower-cased, checked group by group in this
# order: RoPE runs fused with the K/V write (rotary_write_kv), so "rotary" must win over the
# attention group's "write_kv"; the Triton attention kernels are named _prefill_kernel and
# _decode_*; cuBLAS names its kernels nvjet_*, sm90_xmma_gemm_*, cutlass_*gemm*, and
# splitKreduce_kernel for a split-K matmul's reduction.
_MARKERS = {
    "norm+rope+act": ("rms_norm", "rmsnorm", "norm_kernel", "rotary", "rope", "silu", "gelu", "aten::mul"),
    "attention": ("prefill_kernel", "attention", "attn", "flash", "_decode", "write_kv", "softmax"),
    "matmul": (
        "gemm",
        "nvjet",
        "xmma",
        "cublas",
        "splitk",
        "matmul",
        "aten::mm",
        "aten::addmm",
        "aten::bmm",
        "aten::linear",
    ),
}


def kernel_group(name: str) -> str:
    lowered = name.lower()
    for group, markers in _MARKERS.items():
        if any(m in lowered for m in markers):
            return group
    return "other"


def _stem(name: str) -> str:
    # template arguments make every cuBLAS kernel name unique; group by the stem
    return name.split("<")[0].split("(")[0][:80]


def profile_prefill(prefill: Callable[[], object], device: torch.device, top: int) -> dict:
    """Profile one call of `prefill` (already warmed up at its shape): per kernel and per
    group, launches and ms, and the wall time the kernels run in."""
    from torch.profiler import ProfilerActivity, profile

    on_cuda = device.type == "cuda"
    activity = ProfilerActivity.CUDA if on_cuda else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        start = time.perf_counter()
        prefill()
        wall_ms = (time.perf_counter() - start) * 1e3
    kernels: dict[str, dict] = {}
    for event in prof.events():
        if on_cuda:
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = event.device_time_total
        else:  # operators nest on CPU: their own time adds up without counting twice
            us = event.self_cpu_time_total
        # grouped by the whole name (a cuBLAS stem like cutlass::Kernel2 hides the "gemm")
        entry = kernels.setdefault(
            _stem(event.name), {"group": kernel_group(event.name), "launches": 0, "ms": 0.0}
        )
        entry["launches"] += 1
        entry["ms"] += us / 1e3
    groups = {g: 0.0 for g in GROUPS}
    for entry in kernels.values():
        groups[entry["group"]] += entry["ms"]
    busy_ms = sum(groups.values())
    unit = "kernel" if on_cuda else "operator"
    return {
        "wall_ms": wall_ms,
        "busy_ms": busy_ms,
        "groups": groups,
        "kernels": kernels,
        "top": top,
        "unit": unit,
    }


def profile_tables(data: dict, what: str) -> str:
    """The groups (and the time no kernel ran) and the top kernels, as two Markdown tables,
    each figure with its share of the prefill's wall time."""
    wall, busy = data["wall_ms"], data["busy_ms"]
    head = (
        f"where one prefill goes ({what}): {data['unit']}s busy {busy:.2f} ms of {wall:.2f} ms wall "
        "(under the profiler, so slower than the timed runs)"
    )
    idle = max(wall - busy, 0.0)
    group_rows = [
        [g, f"{ms:.3f}", f"{ms / wall:.1%}"]
        for g, ms in [*data["groups"].items(), (f"no {data['unit']} running", idle)]
    ]
    ranked = sorted(data["kernels"].items(), key=lambda kv: -kv[1]["ms"])[: data["top"]]
    kernel_rows = [
        [name, k["group"], str(k["launches"]), f"{k['ms']:.3f}", f"{k['ms'] / wall:.1%}"]
        for name, k in ranked
    ]
    return "\n\n".join(
        [
            head,
            format_table(["group", "ms", "share of wall"], group_rows, "lrr"),
            format_table([data["unit"], "group", "launches", "ms", "share of wall"], kernel_rows, "llrrr"),
        ]
    )
