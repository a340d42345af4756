"""How the GPU benchmarks time a piece of work: triton's do_bench (CUDA events, warm-up,
L2 flushed before each run, median) on a GPU, a host clock on CPU; CUDA-graph capture,
so host launch cost stays out of a figure; and the device-to-device copy bandwidth that
each run measures as its ceiling, with the dense matmul rate beside it."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def time_ms(
    fn: Callable[[], object], device: torch.device, *, warmup_ms: float, rep_ms: float, host_repeats: int
) -> float:
    """Median milliseconds of fn: do_bench on a GPU; on CPU one call to warm up, then the
    median of `host_repeats` calls on the host clock."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    fn()
    times = []
    for _ in range(host_repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def capture_graph(fn: Callable[[], object]) -> torch.cuda.CUDAGraph:
    """fn captured in a CUDA graph, after one call on a side stream (compiling and
    allocating outside the capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def copy_bandwidth(
    device: torch.device, timer: Callable[[Callable[[], object]], float], cpu_bytes: int
) -> float:
    """Bytes read + written per second by a device-to-device copy of 1 GiB (`cpu_bytes` on
    CPU), timed in ms by `timer`."""
    nbytes = (1 << 30) if device.type == "cuda" else cpu_bytes
    src = torch.randn(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3)


def matmul_rate(
    device: torch.device,
    dtype: torch.dtype,
    timer: Callable[[Callable[[], object]], float],
    size: int,
    tries: int,
) -> float:
    """FLOPs per second of a dense size × size × size torch.mm in `dtype`, the best of
    `tries` timings by `timer` (ms): the rate a prefill's matmuls could reach at best here.
    Best, not median: clocks and a neighbour's load only ever slow a try down."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    best_ms = min(timer(lambda: torch.mm(a, b, out=out)) for _ in range(tries))
    return 2 * size**3 / (best_ms * 1e-3)


def fp8_matmul_rate(
    device: torch.device, timer: Callable[[Callable[[], object]], float], size: int, tries: int
) -> float | None:
    """FLOPs per second of a size × size × size float8_e4m3fn matmul with row-wise scales
    and bf16 out (torch._scaled_mm, as common/models/fp8_weights.py runs an fp8 linear), the
    best of `tries`; None where there is none (the CPU, a GPU before compute capability 8.9)."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        return None
    fp8 = torch.float8_e4m3fn
    a = torch.randn(size, size, device=device).to(fp8)
    b = torch.randn(size, size, device=device).to(fp8).t()  # column-major, as _scaled_mm needs
    scale_a = torch.ones(size, 1, device=device)
    scale_b = torch.ones(1, size, device=device)

    def mm() -> torch.Tensor:
        return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16)

    best_ms = min(timer(mm) for _ in range(tries))
    return 2 * size**3 / (best_ms * 1e-3)
