"""What explains a decode step's gap to its floor: each weight's matmul at batch 1 (cuBLAS
against the Triton small-M matmul, `--gemv`), the small-M matmul's tile configs on cold
weights (`--gemv-sweep`) and the kernels of one graph replay (`--profile`)."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from pdserve.bench.decode_step.step_bench import StepBench, time_ms
from pdserve.bench.table import format_table
from pdserve.bench.timing import capture_graph

_GEMV_HEADER = [
    "weight",
    "shape",
    "cuBLAS µs",
    "cuBLAS TB/s",
    "Triton µs",
    "Triton TB/s",
    "Triton of copy bw",
]


def gemv_table(bench: StepBench, bandwidth: float) -> dict:
    """Each weight kind's matmul at batch 1, over every layer's copy (so no weight is
    read from L2), captured in a graph: time per call and bandwidth achieved."""
    model = bench.model
    x = torch.randn(1, 1, dtype=model.embed_tokens.dtype, device=bench.device)  # dtype and device
    kinds = _weights_by_kind(model, with_lm_head=True)
    from common.models import triton_layers

    rows = []
    cells = []
    with torch.inference_mode():
        for name, weights in kinds.items():
            xs = [torch.randn(1, w.shape[1], dtype=x.dtype, device=x.device) for w in weights]
            nbytes = weights[0].numel() * weights[0].element_size()
            times = {}
            for impl, fn in (("cublas", F.linear), ("triton", triton_layers.small_m_matmul)):

                def calls(ws=weights, xs=xs, fn=fn):
                    for w, xi in zip(ws, xs, strict=True):
                        fn(xi, w)

                graph = capture_graph(calls)
                times[impl] = time_ms(graph.replay, bench.device, bench.args.rep_ms / 4) / len(weights)
            tb = {impl: nbytes / (ms * 1e-3) / 1e12 for impl, ms in times.items()}
            rows.append({"weight": name, "shape": list(weights[0].shape), "us": times, "TBps": tb})
            cells.append(
                [name, str(tuple(weights[0].shape)), f"{times['cublas'] * 1e3:.1f}", f"{tb['cublas']:.2f}",
                 f"{times['triton'] * 1e3:.1f}", f"{tb['triton']:.2f}", f"{tb['triton'] * 1e12 / bandwidth:.1%}"]
            )  # fmt: skip
    title = (
        "matmul at batch 1 (CUDA-graph replay over each layer's weight in turn): cuBLAS F.linear "
        "against the Triton small-M matmul"
    )
    text = title + "\n" + format_table(_GEMV_HEADER, cells, "llrrrrr")
    print(text, flush=True)
    return {"data": rows, "text": text}


def gemv_sweep(bench: StepBench) -> dict:
    """Each tile config of the small-M matmul on each weight shape at batch 1, over every
    layer's copy of the weight (from HBM): µs per call, and the best config per shape."""
    from common.models import triton_layers

    kinds = _weights_by_kind(bench.model, with_lm_head=False)
    best = {}
    lines = ["small-M matmul tile sweep at batch 1, cold weights: best config per shape"]
    with torch.inference_mode():
        for name, weights in kinds.items():
            xs = [torch.randn(1, w.shape[1], dtype=w.dtype, device=w.device) for w in weights]
            times = []
            for config in triton_layers.SWEEP_CONFIGS:

                def calls(ws=weights, xs=xs, config=config):
                    for w, xi in zip(ws, xs, strict=True):
                        triton_layers.small_m_matmul(xi, w, config=config)

                try:
                    graph = capture_graph(calls)
                    us = time_ms(graph.replay, bench.device, bench.args.rep_ms / 4) / len(weights) * 1e3
                except Exception as exc:  # a config that does not compile is left out
                    print(f"{name} {config}: {exc!r}", flush=True)
                    continue
                times.append((us, config))
            times.sort(key=lambda t: t[0])
            shape = tuple(weights[0].shape)
            best[str(shape)] = {"us": times[0][0], "config": times[0][1], "worst_us": times[-1][0]}
            lines.append(
                f"{name} {shape}: best {times[0][0]:.1f} µs {times[0][1]}; worst {times[-1][0]:.1f} µs"
            )
    text = "\n".join(lines)
    print(text, flush=True)
    return {"data": best, "text": text}


def kernel_profile(bench: StepBench, batch_size: int) -> dict:
    """Kernels of one graph replay at `batch_size`: time per kind, and the part of the
    step no kernel runs in (launch gaps)."""
    runner = bench.runner
    size = runner.graph_size_for(bench.batch(batch_size))
    if size is None:
        return {"data": {}, "text": "no graph to profile"}
    runner.prepare_inputs(bench.batch(batch_size), pad_to=size)
    replays = 20
    try:
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(replays):
                runner.cuda_graphs.replay(size)
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(replays):
            runner.cuda_graphs.replay(size)
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - start) * 1e6 / replays
        kernels = {}
        for event in prof.events():
            if event.device_type == torch.autograd.DeviceType.CUDA:
                entry = kernels.setdefault(_kernel_kind(event.name), [0, 0.0])
                entry[0] += 1
                entry[1] += event.device_time_total
    except Exception as exc:  # the profiler is a diagnostic: report, do not fail the bench
        return {"data": {"error": repr(exc)}, "text": f"profiler failed: {exc!r}"}
    per_step = {k: (n / replays, us / replays) for k, (n, us) in kernels.items()}
    busy = sum(us for _, us in per_step.values())
    launches = sum(n for n, _ in per_step.values())
    title = (
        f"kernels of one graph replay at B={batch_size}: {launches:.0f} launches, {busy:.0f} µs busy "
        f"of {wall_us:.0f} µs ({wall_us - busy:.0f} µs between kernels)"
    )
    top = sorted(per_step.items(), key=lambda kv: -kv[1][1])[:14]
    cells = [[kind[:70], f"{n:.0f}", f"{us:.0f}", f"{us / wall_us:.1%}"] for kind, (n, us) in top]
    data = {"wall_us": wall_us, "busy_us": busy, "launches": launches, "kernels": per_step}
    text = title + "\n" + format_table(["kernel", "launches", "µs per step", "share"], cells, "lrrr")
    print(text, flush=True)
    return {"data": data, "text": text}


def _kernel_kind(name: str) -> str:
    # template arguments make every cuBLAS kernel name unique; group by the stem
    return name.split("<")[0].split("(")[0][:90]


def _weights_by_kind(model, with_lm_head: bool) -> dict[str, list[torch.Tensor]]:
    """Each weight kind's copies over the layers, so timing them in turn reads each from HBM."""
    kinds = {
        "qkv_proj": [layer.self_attn.qkv_proj.weight for layer in model.layers],
        "o_proj": [layer.self_attn.o_proj.weight for layer in model.layers],
        "gate_up_proj": [layer.mlp.gate_up_proj.weight for layer in model.layers],
        "down_proj": [layer.mlp.down_proj.weight for layer in model.layers],
    }
    if with_lm_head:
        kinds["lm_head"] = [model.lm_head]
    return kinds
