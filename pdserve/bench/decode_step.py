"""`pdserve bench decode-step`: one whole-model decode step against its memory floor.

A decode step reads every weight once (the embedding table excepted: only the batch's rows)
and each sequence's K/V once, and at small batch does little arithmetic, so its floor is

    (bytes of weights read + bytes of K/V read) / device-to-device copy bandwidth,

the copy bandwidth measured in the same run (bytes read + written per second). For each
batch size the bench times the CUDA-graph replay of one decode step (median of many, with
do_bench), the same forward launched eagerly, and the engine's whole step
(ModelRunner.execute: packing the inputs, replay, sampling, reading the tokens back), and
prints the ratio to the floor and tokens/s. Against it: transformers' `generate` on a
model of the same config and dtype on the same GPU (its decode tokens/s, prefill taken out).

`--variants` also times the graphs with cuBLAS for the small-batch matmuls and with the
plain torch layers (no Triton layer kernels at all), `--profile` prints the kernels of one
replay at the smallest batch, and `--gemv` times each weight shape's matmul at batch 1
alone, cuBLAS against the Triton small-M matmul: what explains a gap to the floor.

Defaults: Llama-3-8B shapes (common/models/configs/llama-3-8b.json) with dummy weights,
bf16, batches 1 and 64 at context 1024. `--device cpu` runs the same code eagerly on a
tiny config, to check the command without a GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class StepRow:
    batch: int
    context: int
    graph_ms: float | None  # CUDA-graph replay of one step (forward + logits)
    eager_ms: float  # the same forward launched op by op
    engine_ms: float  # ModelRunner.execute: inputs, replay, sampling, tokens read back
    floor_ms: float
    weight_gb: float
    kv_gb: float
    cublas_graph_ms: float | None = None  # graphs with cuBLAS for the small-batch matmuls
    plain_layers_graph_ms: float | None = None  # graphs with torch layers and cuBLAS
    fused_graph_ms: float | None = None  # forward_small_batch: norms and SiLU into the matmuls
    fused_norm_graph_ms: float | None = None  # ... norms only (SiLU-and-mul a kernel of its own)
    fused_silu_graph_ms: float | None = None  # ... SiLU only (RMSNorm kernels of their own)
    fused_add_graph_ms: float | None = None  # ... only the residual adds into the projections
    no_pdl_graph_ms: float | None = None  # without programmatic dependent launch (and so no prefetch)
    prefetch_0_graph_ms: float | None = None  # PDL, no weight prefetch before the wait
    prefetch_16_graph_ms: float | None = None  # PDL, 16 lines of each weight row prefetched
    prefetch_32_graph_ms: float | None = None  # PDL, 32 lines
    silu_gate_up_graph_ms: float | None = None  # SiLU-and-mul in the gate_up matmul's epilogue
    fused_add_silu_gate_up_graph_ms: float | None = None  # residual adds folded, SiLU in gate_up
    rope_apart_graph_ms: float | None = None  # RoPE and the K/V write in a launch of their own
    hf_decode_tok_s: float | None = None
    hf_total_tok_s: float | None = None

    @property
    def step_ms(self) -> float:
        return self.graph_ms if self.graph_ms is not None else self.eager_ms

    @property
    def ratio(self) -> float:
        return self.step_ms / self.floor_ms


def add_decode_step_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model-config",
        default="llama-3-8b",
        help="a bundled config name (common/models/configs) or a config.json path",
    )
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPES))
    parser.add_argument("--kv-cache-dtype", default="auto", help="auto (= --dtype) or fp8")
    parser.add_argument("--batch-sizes", default="1,64")
    parser.add_argument(
        "--context-len", type=int, default=1024, help="tokens in each sequence at the timed step"
    )
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=None, help="default: the model's context")
    parser.add_argument("--rep-ms", type=float, default=1000.0, help="do_bench repetition time per figure")
    parser.add_argument("--engine-steps", type=int, default=48, help="whole engine steps timed per batch")
    parser.add_argument("--hf-new-tokens", type=int, default=128)
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    parser.add_argument(
        "--variants",
        action="store_true",
        help="also time graphs with cuBLAS matmuls, with torch layers and with each fusion switch flipped",
    )
    parser.add_argument(
        "--try",
        dest="try_switches",
        action="append",
        default=[],
        metavar="MODULE.NAME=VALUE[,...]",
        help="also time graphs recaptured with these module switches (modules: layers, kernels, tiles, "
        "decode; values are Python literals), e.g. --try decode.MIN_SPLIT_TOKENS=256; repeatable",
    )
    parser.add_argument("--profile", action="store_true", help="kernel breakdown of one replay")
    parser.add_argument("--gemv", action="store_true", help="time each weight's matmul at batch 1")
    parser.add_argument("--device", default="auto", help="auto, cuda or cpu (cpu: a tiny eager check)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--gemv-sweep",
        action="store_true",
        help="time every small-M matmul tile config on each weight shape with cold weights and print the best",
    )
    parser.add_argument("--json", dest="json_path", default=None, help="write the figures here as JSON")


def run_decode_step_bench(args: argparse.Namespace) -> int:
    """Run the benchmark and print its table; 0 on success."""
    from common.attention.backend_select import get_attention_backend
    from common.model_files import ModelSource
    from common.models.configs import bundled_config
    from common.models.loader import load_model

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else args.device)
    if args.device == "auto" and device.type != "cuda":
        print(
            "pdserve bench decode-step needs a CUDA device; pass --device cpu for a tiny eager check",
            file=sys.stderr,
        )
        return 2
    config_path = Path(args.model_config)
    if not config_path.is_file():
        config_path = bundled_config(args.model_config)
    batch_sizes = sorted({int(b) for b in args.batch_sizes.split(",") if b})
    torch.manual_seed(args.seed)

    bandwidth = measure_copy_bandwidth(device)
    print(f"device-to-device copy: {bandwidth / 1e12:.3f} TB/s (bytes read + written)", flush=True)

    source = ModelSource("hf_dir", config_path.parent, config_path.stem)
    model_config_probe = json.loads(config_path.read_text())
    max_model_len = args.max_model_len or model_config_probe.get("max_position_embeddings", 8192)
    model, model_config = load_model(
        source,
        load_format="dummy",
        dtype=args.dtype,
        device=device,
        attn_backend=get_attention_backend(device, args.kv_cache_dtype, max_model_len),
        hf_config_path=str(config_path),
        seed=args.seed,
    )
    dtype = next(model.parameters()).dtype
    bench = _StepBench(model, model_config, args, device, dtype, batch_sizes, max_model_len)
    rows = bench.run(bandwidth)
    extra = {}
    if args.gemv and device.type == "cuda":
        extra["gemv"] = bench.gemv_table(bandwidth)
    if args.gemv_sweep and device.type == "cuda":
        extra["gemv_sweep"] = bench.gemv_sweep()
    if args.profile and device.type == "cuda":
        extra["profile"] = bench.profile(batch_sizes[0])
    del bench, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not args.no_hf:
        for row in rows:
            row.hf_decode_tok_s, row.hf_total_tok_s = hf_generate_tokens_per_s(
                config_path, dtype, device, row.batch, args.context_len, args.hf_new_tokens, args.seed
            )
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(
                f"transformers generate B={row.batch}: {row.hf_decode_tok_s:.1f} decode tok/s, "
                f"{row.hf_total_tok_s:.1f} tok/s with prefill",
                flush=True,
            )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print()
    for section in ("gemv", "gemv_sweep", "profile"):
        if section in extra:
            print(extra[section]["text"])
            print()
    print(format_table(rows, bandwidth, name, args))
    if args.json_path:
        with open(args.json_path, "w") as f:
            payload = {
                "device": name,
                "copy_TBps": bandwidth / 1e12,
                "rows": [asdict(r) | {"ratio": r.ratio} for r in rows],
                **{k: v["data"] for k, v in extra.items()},
            }
            json.dump(payload, f, indent=1)
    return 0


def measure_copy_bandwidth(device: torch.device) -> float:
    """Bytes read + written per second by a device-to-device copy of a large buffer."""
    nbytes = (1 << 30) if device.type == "cuda" else (1 << 26)
    src = torch.randn(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, rep_ms=300)
    return 2 * nbytes / (ms * 1e-3)


def time_ms(fn, device: torch.device, rep_ms: float) -> float:
    """Median ms of fn: CUDA events through triton's do_bench on a GPU, a host clock on CPU."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=max(25, rep_ms / 10), rep=rep_ms, return_mode="median")
    fn()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def decode_weight_bytes(model, batch_size: int) -> int:
    """Bytes of parameters one decode step reads: all of them, but only the batch's rows of
    an embedding table that is not also the LM head."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.embed_tokens
    if model.lm_head is not embed:
        total -= embed.numel() * embed.element_size()
        total += batch_size * embed.shape[1] * embed.element_size()
    return total


def decode_kv_bytes(model_config, batch_size: int, context: int, kv_dtype: torch.dtype) -> int:
    """Bytes of K and V one decode step reads: every layer, every position of every sequence."""
    per_token = 2 * model_config.num_hidden_layers * model_config.num_key_value_heads * model_config.head_dim
    return batch_size * context * per_token * torch.empty((), dtype=kv_dtype).element_size()


class _StepBench:
    def __init__(self, model, model_config, args, device, dtype, batch_sizes, max_model_len) -> None:
        from common.engine.model_runner import ModelRunner

        self.model = model
        self.model_config = model_config
        self.args = args
        self.device = device
        self.batch_sizes = batch_sizes
        self.context = args.context_len
        self.blocks_per_seq = -(-(self.context + args.engine_steps + 1) // args.block_size)
        self.runner = ModelRunner(
            model,
            model_config,
            num_blocks=1 + max(batch_sizes) * self.blocks_per_seq,
            block_size=args.block_size,
            kv_cache_dtype=args.kv_cache_dtype,
            device=device,
            dtype=dtype,
            seed=args.seed,
            max_model_len=max_model_len,
            max_num_seqs=max(batch_sizes),
            cuda_graph_sizes=batch_sizes,
            enforce_eager=device.type != "cuda",
        )
        _fill_random(self.runner.kv_cache)

    def batch(self, batch_size: int):
        """batch_size sequences whose context_len - 1 tokens are in the cache: one decode step."""
        from common.engine.request import Request
        from common.engine.scheduled_batch import ScheduledBatch
        from common.sampling_params import SamplingParams

        generator = torch.Generator().manual_seed(batch_size)
        vocab = self.model_config.vocab_size
        requests = []
        for i in range(batch_size):
            prompt = torch.randint(0, vocab, (self.context,), generator=generator).tolist()
            request = Request(f"bench-{i}", prompt, SamplingParams(temperature=0.0, ignore_eos=True))
            request.num_computed_tokens = self.context - 1
            requests.append(request)
        bps = self.blocks_per_seq
        tables = [list(range(1 + i * bps, 1 + (i + 1) * bps)) for i in range(batch_size)]
        return ScheduledBatch(requests, [1] * batch_size, tables)

    @torch.inference_mode()
    def run(self, bandwidth: float) -> list[StepRow]:
        rows = []
        for b in self.batch_sizes:
            rows.append(self.time_batch(b, bandwidth))
            r = rows[-1]
            graph = f"{r.graph_ms:.3f} ms graph replay, " if r.graph_ms is not None else ""
            print(
                f"B={b} ctx={self.context}: {graph}{r.eager_ms:.3f} ms eager, {r.engine_ms:.3f} ms engine step; "
                f"floor {r.floor_ms:.3f} ms -> {r.ratio:.3f}x",
                flush=True,
            )
        if self.runner.cuda_graphs is not None:
            for text in self.args.try_switches:
                self.time_variant(rows, None, parse_switches(text))
        if self.args.variants and self.runner.cuda_graphs is not None:
            self.time_variant(rows, "cublas_graph_ms", {"layers.USE_TRITON_SMALL_MATMUL": False})
            self.time_variant(rows, "plain_layers_graph_ms", {"layers.USE_TRITON_KERNELS": False})
            self.time_variant(rows, "no_pdl_graph_ms", {"tiles.USE_PDL": False})
            for lines in (0, 16, 32):
                self.time_variant(rows, f"prefetch_{lines}_graph_ms", {"kernels.PREFETCH_LINES": lines})
            self.time_variant(rows, "silu_gate_up_graph_ms", {"layers.FUSE_SILU_INTO_GATE_UP": True})
            self.time_variant(rows, "rope_apart_graph_ms", {"layers.FUSE_ROPE_INTO_DECODE": False})
            self.time_variant(
                rows,
                "fused_add_silu_gate_up_graph_ms",
                {
                    "layers.USE_FUSED_SMALL_BATCH": True,
                    "layers.FUSE_NORM_INTO_MATMUL": False,
                    "layers.FUSE_SILU_INTO_GATE_UP": True,
                },
            )
            # the earlier folds, each with SiLU where that variant puts it (not in gate_up's epilogue)
            fused = {"layers.USE_FUSED_SMALL_BATCH": True, "layers.FUSE_SILU_INTO_GATE_UP": False}
            self.time_variant(rows, "fused_graph_ms", fused)
            self.time_variant(rows, "fused_norm_graph_ms", fused | {"layers.FUSE_SILU_INTO_MATMUL": False})
            self.time_variant(rows, "fused_silu_graph_ms", fused | {"layers.FUSE_NORM_INTO_MATMUL": False})
            self.time_variant(
                rows,
                "fused_add_graph_ms",
                fused | {"layers.FUSE_NORM_INTO_MATMUL": False, "layers.FUSE_SILU_INTO_MATMUL": False},
            )
        return rows

    def time_variant(self, rows: list[StepRow], field: str | None, switches: dict[str, object]) -> None:
        """Recapture the graphs with module switches set ("layers." common.models.layers,
        "kernels." common.models.triton_layers, "tiles." common.attention.triton_paged_tiles)
        and time every batch; a variant that fails is reported and left out."""
        from common.attention import triton_decode, triton_paged_tiles
        from common.models import layers, triton_layers

        modules = {
            "layers": layers,
            "kernels": triton_layers,
            "tiles": triton_paged_tiles,
            "decode": triton_decode,
        }
        targets = {key: (modules[key.split(".")[0]], key.split(".")[1]) for key in switches}
        saved = {key: getattr(module, name) for key, (module, name) in targets.items()}
        for key, (module, name) in targets.items():
            setattr(module, name, switches[key])
        try:
            self.runner.capture_cuda_graphs()
            for row in rows:
                self.runner.prepare_inputs(self.batch(row.batch), pad_to=row.batch)
                ms = time_ms(
                    lambda b=row.batch: self.runner.cuda_graphs.replay(b), self.device, self.args.rep_ms
                )
                if field is not None:
                    setattr(row, field, ms)
                print(f"B={row.batch}: {ms:.3f} ms graph replay with {switches}", flush=True)
        except Exception as exc:  # a variant is a diagnostic: report it, keep the bench going
            print(f"variant {switches} failed: {exc!r}", flush=True)
        finally:
            for key, (module, name) in targets.items():
                setattr(module, name, saved[key])
            self.runner.capture_cuda_graphs()

    def time_batch(self, batch_size: int, bandwidth: float) -> StepRow:
        runner, model, rep = self.runner, self.model, self.args.rep_ms
        batch = self.batch(batch_size)
        graph_ms = None
        size = runner.graph_size_for(batch)
        if size is not None:
            runner.prepare_inputs(batch, pad_to=size)
            graph_ms = time_ms(lambda: runner.cuda_graphs.replay(size), self.device, rep)
        inputs = runner.prepare_inputs(batch)

        def eager():
            hidden = model(inputs.input_ids, inputs.positions, runner.kv_cache, inputs.attn_metadata)
            return model.compute_logits(hidden)

        eager_ms = time_ms(eager, self.device, rep)
        engine_ms = self.time_engine_steps(batch)
        weight_bytes = decode_weight_bytes(model, batch_size)
        kv_bytes = decode_kv_bytes(self.model_config, batch_size, self.context, runner.kv_cache.dtype)
        return StepRow(
            batch=batch_size,
            context=self.context,
            graph_ms=graph_ms,
            eager_ms=eager_ms,
            engine_ms=engine_ms,
            floor_ms=(weight_bytes + kv_bytes) / bandwidth * 1e3,
            weight_gb=weight_bytes / 1e9,
            kv_gb=kv_bytes / 1e9,
        )

    def time_engine_steps(self, batch) -> float:
        """Median wall time of ModelRunner.execute over consecutive decode steps (each one
        token longer), from packing the inputs to the sampled tokens on the host."""
        runner = self.runner
        times = []
        for _ in range(max(3, self.args.engine_steps)):
            start = time.perf_counter()
            sampled = runner.execute(batch)
            times.append((time.perf_counter() - start) * 1e3)
            for request in batch.requests:
                request.num_computed_tokens += 1
                request.append_output_token(sampled[request.request_id].token_id)
        return statistics.median(times[2:])  # the first steps warm the host path

    def gemv_table(self, bandwidth: float) -> dict:
        """Each weight kind's matmul at batch 1, over every layer's copy (so no weight is
        read from L2), captured in a graph: time per call and bandwidth achieved."""
        model = self.model
        x = torch.randn(1, 1, dtype=model.embed_tokens.dtype, device=self.device)  # dtype and device
        kinds = {
            "qkv_proj": [layer.self_attn.qkv_proj.weight for layer in model.layers],
            "o_proj": [layer.self_attn.o_proj.weight for layer in model.layers],
            "gate_up_proj": [layer.mlp.gate_up_proj.weight for layer in model.layers],
            "down_proj": [layer.mlp.down_proj.weight for layer in model.layers],
            "lm_head": [model.lm_head],
        }
        from common.models import triton_layers

        rows = []
        lines = [
            "matmul at batch 1 (CUDA-graph replay over each layer's weight in turn): cuBLAS F.linear "
            "against the Triton small-M matmul",
            "| weight | shape | cuBLAS µs | cuBLAS TB/s | Triton µs | Triton TB/s | Triton of copy bw |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        with torch.inference_mode():
            for name, weights in kinds.items():
                xs = [torch.randn(1, w.shape[1], dtype=x.dtype, device=x.device) for w in weights]
                nbytes = weights[0].numel() * weights[0].element_size()
                times = {}
                for impl, fn in (("cublas", F.linear), ("triton", triton_layers.small_m_matmul)):

                    def calls(ws=weights, xs=xs, fn=fn):
                        for w, xi in zip(ws, xs, strict=True):
                            fn(xi, w)

                    graph = _capture(calls)
                    times[impl] = time_ms(graph.replay, self.device, self.args.rep_ms / 4) / len(weights)
                tb = {impl: nbytes / (ms * 1e-3) / 1e12 for impl, ms in times.items()}
                rows.append({"weight": name, "shape": list(weights[0].shape), "us": times, "TBps": tb})
                lines.append(
                    f"| {name} | {tuple(weights[0].shape)} | {times['cublas'] * 1e3:.1f} | {tb['cublas']:.2f} "
                    f"| {times['triton'] * 1e3:.1f} | {tb['triton']:.2f} | {tb['triton'] * 1e12 / bandwidth:.1%} |"
                )
        text = "\n".join(lines)
        print(text, flush=True)
        return {"data": rows, "text": text}

    def gemv_sweep(self) -> dict:
        """Each tile config of the small-M matmul on each weight shape at batch 1, over every
        layer's copy of the weight (from HBM): µs per call, and the best config per shape."""
        from common.models import triton_layers

        model = self.model
        kinds = {
            "qkv_proj": [layer.self_attn.qkv_proj.weight for layer in model.layers],
            "o_proj": [layer.self_attn.o_proj.weight for layer in model.layers],
            "gate_up_proj": [layer.mlp.gate_up_proj.weight for layer in model.layers],
            "down_proj": [layer.mlp.down_proj.weight for layer in model.layers],
        }
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
                        graph = _capture(calls)
                        us = time_ms(graph.replay, self.device, self.args.rep_ms / 4) / len(weights) * 1e3
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

    def profile(self, batch_size: int) -> dict:
        """Kernels of one graph replay at `batch_size`: time per kind, and the part of the
        step no kernel runs in (launch gaps)."""
        runner = self.runner
        size = runner.graph_size_for(self.batch(batch_size))
        if size is None:
            return {"data": {}, "text": "no graph to profile"}
        runner.prepare_inputs(self.batch(batch_size), pad_to=size)
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
        lines = [
            f"kernels of one graph replay at B={batch_size}: {launches:.0f} launches, {busy:.0f} µs busy "
            f"of {wall_us:.0f} µs ({wall_us - busy:.0f} µs between kernels)",
            "| kernel | launches | µs per step | share |",
            "|---|---:|---:|---:|",
        ]
        for kind, (n, us) in sorted(per_step.items(), key=lambda kv: -kv[1][1])[:14]:
            lines.append(f"| {kind[:70]} | {n:.0f} | {us:.0f} | {us / wall_us:.1%} |")
        data = {"wall_us": wall_us, "busy_us": busy, "launches": launches, "kernels": per_step}
        text = "\n".join(lines)
        print(text, flush=True)
        return {"data": data, "text": text}


def _kernel_kind(name: str) -> str:
    # template arguments make every cuBLAS kernel name unique; group by the stem
    return name.split("<")[0].split("(")[0][:90]


def _capture(fn) -> torch.cuda.CUDAGraph:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def _fill_random(kv_cache: torch.Tensor) -> None:
    """K/V values like real ones (never zeros, which can time differently), block by block."""
    generator = torch.Generator(device=kv_cache.device).manual_seed(1)
    chunk = 64
    for start in range(0, kv_cache.shape[0], chunk):
        part = kv_cache[start : start + chunk]
        part.copy_(torch.randn(part.shape, generator=generator, device=kv_cache.device, dtype=torch.bfloat16))


def hf_generate_tokens_per_s(
    config_path: Path,
    dtype: torch.dtype,
    device: torch.device,
    batch: int,
    context: int,
    new_tokens: int,
    seed: int,
) -> tuple[float, float]:
    """transformers' greedy `generate` on a random-weight model of the same config: (decode
    tokens/s with the prefill's time taken out, tokens/s including it)."""
    import transformers

    config = transformers.LlamaConfig(**json.loads(config_path.read_text()))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (batch, context), generator=generator).to(device)
    mask = torch.ones_like(ids)

    def generate(n: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
            )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        assert out.shape[1] == context + n, out.shape
        return time.perf_counter() - start

    generate(2)  # warm-up
    with_prefill = generate(new_tokens)
    prefill = generate(1)
    decode_secs = with_prefill - prefill
    decode_tok_s = batch * (new_tokens - 1) / decode_secs if decode_secs > 0 else float("nan")
    return decode_tok_s, batch * new_tokens / with_prefill


def format_table(rows: list[StepRow], bandwidth: float, device_name: str, args) -> str:
    head = [
        f"whole-model decode step: {args.model_config}, {args.dtype}, KV cache {args.kv_cache_dtype}; "
        f"device {device_name}; copy bandwidth {bandwidth / 1e12:.2f} TB/s measured in this run",
        "",
        "| batch | context | weights + KV read GB | floor ms | graph step ms | ratio | tok/s (graph) "
        "| engine step ms | tok/s (engine) | eager step ms | graph ms, cuBLAS matmuls | graph ms, torch layers "
        "| graph ms, fused norm+SiLU | fused norm | fused SiLU | fused adds only "
        "| graph ms, no PDL | PDL, prefetch 0 | prefetch 16 | prefetch 32 "
        "| SiLU in gate_up epilogue | fused adds + SiLU in gate_up | RoPE + K/V write apart "
        "| HF generate tok/s | engine vs HF |",
        "|" + "---:|" * 25,
    ]
    lines = []

    def ms(value: float | None) -> str:
        return f"{value:.3f}" if value is not None else "-"

    for r in rows:
        graph, plain, cublas = ms(r.graph_ms), ms(r.plain_layers_graph_ms), ms(r.cublas_graph_ms)
        fused = (r.fused_graph_ms, r.fused_norm_graph_ms, r.fused_silu_graph_ms, r.fused_add_graph_ms)
        pdl = (r.no_pdl_graph_ms, r.prefetch_0_graph_ms, r.prefetch_16_graph_ms, r.prefetch_32_graph_ms)
        silu = (r.silu_gate_up_graph_ms, r.fused_add_silu_gate_up_graph_ms, r.rope_apart_graph_ms)
        variants = " | ".join(ms(v) for v in (*fused, *pdl, *silu))
        hf = f"{r.hf_decode_tok_s:.0f}" if r.hf_decode_tok_s is not None else "-"
        engine_tok_s = r.batch / (r.engine_ms * 1e-3)
        vs_hf = f"{engine_tok_s / r.hf_decode_tok_s:.1f}x" if r.hf_decode_tok_s else "-"
        lines.append(
            f"| {r.batch} | {r.context} | {r.weight_gb:.2f} + {r.kv_gb:.2f} | {r.floor_ms:.3f} | {graph} "
            f"| {r.ratio:.3f} | {r.batch / (r.step_ms * 1e-3):.0f} | {r.engine_ms:.3f} | {engine_tok_s:.0f} "
            f"| {r.eager_ms:.3f} | {cublas} | {plain} | {variants} | {hf} | {vs_hf} |"
        )
    return "\n".join(head + lines)


def parse_switches(text: str) -> dict[str, object]:
    """ "decode.MIN_SPLIT_TOKENS=256,tiles.USE_PDL=False" as {"decode.MIN_SPLIT_TOKENS": 256, ...}."""
    import ast

    switches: dict[str, object] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or key.count(".") != 1:
            raise SystemExit(
                f"--try {text!r}: each switch is MODULE.NAME=VALUE, e.g. decode.MIN_SPLIT_TOKENS=256"
            )
        try:
            switches[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise SystemExit(
                f"--try {text!r}: {value.strip()!r} is not a Python literal (a number, True, ...)"
            ) from None
    return switches


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pdserve bench decode-step", description=__doc__.splitlines()[0])
    add_decode_step_args(parser)
    return run_decode_step_bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
