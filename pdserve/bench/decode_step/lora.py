"""`pdserve bench decode-step --loras N`: the decode step with the batch spread over N
LoRA adapters (all seven target modules, rank --lora-rank) against the same step on the
base model, and against a naive per-request loop (each sequence's own x A^T B^T, one
after another, as a server without batched LoRA kernels would).

The adapters are random PEFT folders written to a temporary directory at the model's
shapes, read by the engine's own loader; every sequence of a batch takes adapter
i mod N. Times: a CUDA-graph replay (the engine's decode path), the runner's whole step
(ModelRunner.execute: packing, the adapters' slot buffers, forward, sampling), and eager
forwards for the torch and naive paths.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from pdserve.bench.table import format_table


def write_random_adapter(folder: Path, model_config, rank: int, seed: int, dtype) -> Path:
    """A PEFT folder with A, B ~ N(0, 0.01) on every target module of every layer."""
    import torch
    from safetensors.torch import save_file

    from common.lora.peft_adapter import TARGET_MODULES, module_shapes

    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": list(TARGET_MODULES),
        "bias": "none",
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(model_config.num_hidden_layers):
        for module, (in_f, out_f) in module_shapes(model_config).items():
            prefix = f"base_model.model.model.layers.{layer}.{TARGET_MODULES[module]}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, in_f, generator=generator) * 0.01).to(
                dtype
            )
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(out_f, rank, generator=generator) * 0.01).to(
                dtype
            )
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def time_lora(bench: Any, batch_sizes: list[int], num_loras: int, rank: int) -> list[dict[str, Any]]:
    """Per batch size: base and LoRA graph replays, runner steps and eager forwards, and the
    naive per-request loop's eager forward."""
    import torch

    from common.config.lora_config import LoRAConfig
    from common.engine.model_runner import ModelRunner
    from common.lora.adapter_cache import AdapterCache
    from common.lora.lora_layer import detach_lora
    from common.lora.lora_request import LoRARequest
    from pdserve.bench.decode_step.step_bench import time_ms

    args, device, model = bench.args, bench.device, bench.model
    dtype = next(model.parameters()).dtype
    tmp = tempfile.TemporaryDirectory(prefix="pdserve-bench-lora-")
    started = time.perf_counter()
    loras = [
        LoRARequest(
            f"bench{i}",
            str(write_random_adapter(Path(tmp.name) / f"a{i}", bench.model_config, rank, i, dtype)),
            i + 1,
        )
        for i in range(num_loras)
    ]
    print(f"{num_loras} rank-{rank} adapters written in {time.perf_counter() - started:.1f} s", flush=True)
    config = LoRAConfig(
        enable_lora=True, max_loras=num_loras, max_lora_rank=max(rank, 16), max_cpu_loras=num_loras
    )
    cache = AdapterCache(bench.model_config, capacity=num_loras, max_rank=config.max_lora_rank, dtype=dtype)
    base_runner = bench.runner
    runner = ModelRunner(
        model,
        bench.model_config,
        num_blocks=base_runner.num_blocks,
        block_size=args.block_size,
        kv_cache_dtype=args.kv_cache_dtype,
        device=device,
        dtype=dtype,
        seed=args.seed,
        max_model_len=base_runner.max_model_len,
        max_num_seqs=max(batch_sizes),
        cuda_graph_sizes=batch_sizes,
        enforce_eager=device.type != "cuda",
        lora_config=config,
        lora_cache=cache,
        max_num_batched_tokens=max(batch_sizes),
    )
    runner.kv_cache.copy_(base_runner.kv_cache)
    rows = []
    try:
        for b in batch_sizes:
            row: dict[str, Any] = {"batch": b, "loras": num_loras, "rank": rank}
            for name, use in (("base", None), ("lora", loras)):
                bench.runner = base_runner if use is None else runner
                batch = bench.batch(b)
                if use is not None:
                    for i, request in enumerate(batch.requests):
                        request.lora = use[i % len(use)]
                r = bench.runner
                size = r.graph_size_for(batch)
                if size is not None:
                    r.prepare_inputs(batch, pad_to=size)
                    row[f"{name}_graph_ms"] = time_ms(
                        lambda r=r, size=size: r.cuda_graphs.replay(size), device, args.rep_ms
                    )
                inputs = r.prepare_inputs(batch)
                row[f"{name}_eager_ms"] = time_ms(
                    lambda r=r, inputs=inputs: r.forward(inputs), device, args.rep_ms
                )
                if name == "lora":
                    row["naive_eager_ms"] = _time_naive(r, inputs, device, args.rep_ms)
                row[f"{name}_engine_ms"] = bench.time_engine_steps(batch)
            rows.append(row)
            graph = (
                f"graph {row['base_graph_ms']:.3f} -> {row['lora_graph_ms']:.3f} ms "
                f"({row['lora_graph_ms'] / row['base_graph_ms']:.3f}x), "
                if "lora_graph_ms" in row
                else ""
            )
            print(
                f"B={b}, {num_loras} adapters of rank {rank}: {graph}engine step {row['base_engine_ms']:.3f} -> "
                f"{row['lora_engine_ms']:.3f} ms ({row['lora_engine_ms'] / row['base_engine_ms']:.3f}x); eager "
                f"{row['base_eager_ms']:.3f} base, {row['lora_eager_ms']:.3f} batched LoRA, "
                f"{row['naive_eager_ms']:.3f} naive per-request loop",
                flush=True,
            )
    finally:
        bench.runner = base_runner
        detach_lora(model)
        del runner
        tmp.cleanup()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _time_naive(runner, inputs, device, rep_ms: float) -> float:
    """The eager forward with every LoRA layer applying each sequence's adapter on its own
    rows, one sequence after another (per-request x A^T B^T in torch)."""
    from common.lora import lora_layer
    from pdserve.bench.decode_step.step_bench import time_ms

    batch = inputs.lora
    # each request's rows: the packed tokens between its query start locations
    starts = inputs.attn_metadata.query_start_loc.tolist()
    slots = batch.token_slots.tolist()
    per_request = [
        (slots[lo], lo, hi)
        for lo, hi in zip(starts[:-1], starts[1:], strict=True)
        if hi > lo and slots[lo] >= 0
    ]
    original = lora_layer.LinearLoRA.__call__

    def naive(self, x, y):
        max_rank = self.b.shape[2]
        for slot, lo, hi in per_request:
            xs = x[lo:hi]
            for j in range(len(self.modules)):
                a = self.a[slot, j * max_rank : (j + 1) * max_rank]
                b = self.b[slot, self.bands[j] : self.bands[j + 1]]
                y[lo:hi, self.bands[j] : self.bands[j + 1]] += (xs @ a.T) @ b.T * self.scales[slot]
        return y

    lora_layer.LinearLoRA.__call__ = naive
    try:
        return time_ms(lambda: runner.forward(inputs), device, rep_ms)
    finally:
        lora_layer.LinearLoRA.__call__ = original


def lora_table(rows: list[dict[str, Any]]) -> str:
    header = [
        "batch",
        "adapters x rank",
        "base graph (ms)",
        "LoRA graph (ms)",
        "graph ratio",
        "base step (ms)",
        "LoRA step (ms)",
        "step ratio",
        "eager base / batched LoRA / naive loop (ms)",
    ]
    cells = []
    for r in rows:
        graph = "lora_graph_ms" in r
        cells.append(
            [
                str(r["batch"]),
                f"{r['loras']} x {r['rank']}",
                f"{r['base_graph_ms']:.3f}" if graph else "-",
                f"{r['lora_graph_ms']:.3f}" if graph else "-",
                f"{r['lora_graph_ms'] / r['base_graph_ms']:.3f}x" if graph else "-",
                f"{r['base_engine_ms']:.3f}",
                f"{r['lora_engine_ms']:.3f}",
                f"{r['lora_engine_ms'] / r['base_engine_ms']:.3f}x",
                f"{r['base_eager_ms']:.2f} / {r['lora_eager_ms']:.2f} / {r['naive_eager_ms']:.2f}",
            ]
        )
    return (
        "LoRA decode step: every sequence under one of the adapters (i mod N), all seven modules\n\n"
        + format_table(header, cells, "r" * len(header))
    )
