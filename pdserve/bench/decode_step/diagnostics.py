"""What explains a decode step's gap to its floor: each weight's matmul at batch 1 (cuBLAS
against the Triton small-M matmul, `--gemv`; fp8 weights through their own matmul), the
small-M matmul's tile configs on cold weights (`--gemv-sweep`) and the kernels of one graph
replay (`--profile`).

A mixture-of-experts layer has no gate_up/down Linear: its experts are stacked tensors
multiplied by the fused-MoE path (timed by `pdserve bench moe-kernel`), so the per-weight
tables leave them out and say so."""

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


_FP8_HEADER = ["weight", "shape", "bytes", "fp8 matmul µs", "TB/s", "of copy bw"]


def gemv_table(bench: StepBench, bandwidth: float) -> dict:
    """Each weight kind's matmul at batch 1, over every layer's copy (so no weight is
    read from L2), captured in a graph: time per call and bandwidth achieved. fp8 weights
    are timed through their own matmul (activation quantization included), in a table
    of their own."""
    model = bench.model
    x = torch.randn(1, 1, dtype=model.embed_tokens.dtype, device=bench.device)  # dtype and device
    kinds, packed, notes = _weights_by_kind(model, with_lm_head=True)
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
        fp8_rows, fp8_cells = _time_packed(bench, packed, bandwidth)
    title = (
        "matmul at batch 1 (CUDA-graph replay over each layer's weight in turn): cuBLAS F.linear "
        "against the Triton small-M matmul"
    )
    parts = [title + "\n" + format_table(_GEMV_HEADER, cells, "llrrrrr")] if cells else []
    if fp8_cells:
        parts.append(
            "fp8 weights at batch 1 (their matmul: per-token activation quantization and "
            "torch._scaled_mm; bytes = fp8 values + fp32 row scales)\n"
            + format_table(_FP8_HEADER, fp8_cells, "llrrrr")
        )
    text = "\n\n".join(parts + notes)
    print(text, flush=True)
    return {"data": rows + fp8_rows, "text": text}


def _time_packed(bench: StepBench, packed: dict[str, list], bandwidth: float) -> tuple[list, list]:
    """Each packed (fp8) weight kind's own matmul at batch 1 over every layer's copy."""
    rows, cells = [], []
    for name, weights in packed.items():
        xs = [torch.randn(1, w.in_features, dtype=bench.model.embed_tokens.dtype, device=bench.device)
              for w in weights]  # fmt: skip
        nbytes = weights[0].nbytes()

        def calls(ws=weights, xs=xs):
            for w, xi in zip(ws, xs, strict=True):
                w.matmul(xi)

        graph = capture_graph(calls)
        ms = time_ms(graph.replay, bench.device, bench.args.rep_ms / 4) / len(weights)
        tb = nbytes / (ms * 1e-3) / 1e12
        shape = [weights[0].out_features, weights[0].in_features]
        rows.append({"weight": name, "shape": shape, "bytes": nbytes, "us": {"fp8": ms}, "TBps": {"fp8": tb}})
        cells.append([name, str(tuple(shape)), str(nbytes), f"{ms * 1e3:.1f}", f"{tb:.2f}",
                      f"{tb * 1e12 / bandwidth:.1%}"])  # fmt: skip
    return rows, cells


def gemv_sweep(bench: StepBench) -> dict:
    """Each tile config of the small-M matmul on each weight shape at batch 1, over every
    layer's copy of the weight (from HBM): µs per call, and the best config per shape."""
    from common.models import triton_layers

    kinds, _packed, notes = _weights_by_kind(bench.model, with_lm_head=False)
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
    text = "\n".join(lines + notes)
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


def _weights_by_kind(model, with_lm_head: bool) -> tuple[dict[str, list], dict[str, list], list[str]]:
    """Each weight kind's copies over the layers, so timing them in turn reads each from HBM:
    (dense weights by kind, packed weights by kind, notes on the kinds left out). A kind's
    Linear that serves from `packed` (fp8) holds only a zero-strided stand-in for its dense
    weight, which a dense matmul would time reading nothing."""
    linears = {
        "qkv_proj": [layer.self_attn.qkv_proj for layer in model.layers],
        "o_proj": [layer.self_attn.o_proj for layer in model.layers],
    }
    notes = []
    if all(hasattr(layer.mlp, "gate_up_proj") for layer in model.layers):
        linears["gate_up_proj"] = [layer.mlp.gate_up_proj for layer in model.layers]
        linears["down_proj"] = [layer.mlp.down_proj for layer in model.layers]
    else:
        notes.append(
            "gate_up_proj, down_proj: left out, the layers are mixture-of-experts (stacked experts, "
            "no Linear); `pdserve bench moe-kernel` times their matmuls"
        )
    kinds, packed = {}, {}
    for name, modules in linears.items():
        if all(m.packed is None for m in modules):
            kinds[name] = [m.weight for m in modules]
        elif all(hasattr(m.packed, "nbytes") and hasattr(m.packed, "in_features") for m in modules):
            packed[name] = [m.packed for m in modules]
        else:
            notes.append(f"{name}: left out, its layers mix dense and packed weights")
    if with_lm_head:
        if model.lm_head_packed is None:
            kinds["lm_head"] = [model.lm_head]
        else:
            notes.append("lm_head: left out, it is packed (GGUF)")
    return kinds, packed, notes
