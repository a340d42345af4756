"""The timed part of `pdserve bench decode-step`: a ModelRunner over the model with a
random KV cache, a batch of sequences at the context length, and per batch size the
CUDA-graph replay, the eager forward and the engine's whole step, against the floor of
the bytes a step must read; `--variants` and `--try` recapture the graphs with module
switches flipped."""

from __future__ import annotations

import ast
import statistics
import time

import torch

from common.models.moe import experts_in_fp8
from pdserve.bench import timing
from pdserve.bench.decode_step.moe_routing import measured_experts_touched
from pdserve.bench.decode_step.report import StepRow
from pdserve.bench.model_costs import ModelCosts


def time_ms(fn, device: torch.device, rep_ms: float) -> float:
    """Median ms of fn (do_bench on a GPU, a host clock on CPU), warmed up for a tenth of
    `rep_ms` and at least 25 ms."""
    return timing.time_ms(fn, device, warmup_ms=max(25, rep_ms / 10), rep_ms=rep_ms, host_repeats=5)


def measure_copy_bandwidth(device: torch.device) -> float:
    """Bytes read + written per second by a device-to-device copy of a large buffer."""
    return timing.copy_bandwidth(device, lambda fn: time_ms(fn, device, rep_ms=300), cpu_bytes=1 << 26)


class StepBench:
    """The model under a ModelRunner, timed a batch size at a time."""

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
            enforce_eager=device.type != "cuda" or args.enforce_eager,
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
            experts = ""
            if r.all_experts_floor_ms is not None:
                experts = (
                    f"; experts a layer {r.experts_uniform:.1f} uniform, {r.experts_measured:.1f} measured; "
                    f"all-experts floor {r.all_experts_floor_ms:.3f} ms"
                )
            print(
                f"B={b} ctx={self.context}: {graph}{r.eager_ms:.3f} ms eager, {r.engine_ms:.3f} ms engine step; "
                f"floor {r.floor_ms:.3f} ms -> {r.ratio:.3f}x{experts}",
                flush=True,
            )
        if self.runner.cuda_graphs is not None:
            for text in self.args.try_switches:
                self.time_variant(rows, None, parse_switches(text))
            if self.args.fp8_small_m == "both":
                self.time_variant(rows, "fp8_triton_graph_ms", {"fp8.USE_TRITON_FP8_SMALL_M": True})
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
        "kernels." common.models.triton_layers, "tiles." common.attention.triton_paged_tiles,
        "decode." common.attention.triton_decode, "fp8." common.models.fp8_weights, "moe."
        common.models.moe) and time
        every batch; a variant that fails is reported and left out."""
        from common.attention import triton_decode, triton_paged_tiles
        from common.models import fp8_weights, layers, moe, triton_layers

        modules = {
            "layers": layers,
            "kernels": triton_layers,
            "tiles": triton_paged_tiles,
            "decode": triton_decode,
            "fp8": fp8_weights,
            "moe": moe,
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
        experts_measured = measured_experts_touched(model, eager) if self.model_config.num_experts else None
        engine_ms = self.time_engine_steps(batch)
        costs = ModelCosts.from_config(self.model_config)
        # the floor: the dtype's bytes, fp8 linears at theirs, the experts B tokens touch
        # under uniform routing (k at batch 1); beside it, the floor of reading every expert
        weight_bytes, all_experts = (
            costs.decode_weight_bytes(
                batch_size,
                model.embed_tokens.element_size(),
                fp8_linears=self.args.quantization == "fp8",
                fp8_experts=experts_in_fp8(model),
                experts_read=read,
            )
            for read in (None, costs.num_experts)
        )
        kv_bytes = batch_size * self.context * costs.kv_bytes_per_token(runner.kv_cache.element_size())
        moe = bool(costs.num_experts)
        return StepRow(
            batch=batch_size,
            context=self.context,
            graph_ms=graph_ms,
            eager_ms=eager_ms,
            engine_ms=engine_ms,
            floor_ms=(weight_bytes + kv_bytes) / bandwidth * 1e3,
            weight_gb=weight_bytes / 1e9,
            kv_gb=kv_bytes / 1e9,
            experts_uniform=costs.experts_touched(batch_size) if moe else None,
            experts_measured=experts_measured,
            all_experts_floor_ms=(all_experts + kv_bytes) / bandwidth * 1e3 if moe else None,
        )

    def time_engine_steps(self, batch, restart_grammars: bool = False) -> float:
        """Median wall time of ModelRunner.execute over consecutive decode steps (each one
        token longer), from packing the inputs to the sampled tokens on the host.
        restart_grammars: a request whose grammar has finished starts it again."""
        runner = self.runner
        times = []
        for _ in range(max(3, self.args.engine_steps)):
            start = time.perf_counter()
            sampled = runner.execute(batch)
            times.append((time.perf_counter() - start) * 1e3)
            for request in batch.requests:
                request.num_computed_tokens += 1
                request.append_output_token(sampled[request.request_id].token_id)
                if restart_grammars and request.grammar.is_terminated():
                    request.grammar.reset()
        return statistics.median(times[2:])  # the first steps warm the host path


def _fill_random(kv_cache: torch.Tensor) -> None:
    """K/V values like real ones (never zeros, which can time differently), block by block."""
    generator = torch.Generator(device=kv_cache.device).manual_seed(1)
    chunk = 64
    for start in range(0, kv_cache.shape[0], chunk):
        part = kv_cache[start : start + chunk]
        part.copy_(torch.randn(part.shape, generator=generator, device=kv_cache.device, dtype=torch.bfloat16))


SWITCH_MODULES = ("layers", "kernels", "tiles", "decode", "fp8", "moe")  # time_variant's modules


def parse_switches(text: str) -> dict[str, object]:
    """ "decode.MIN_SPLIT_TOKENS=256,tiles.USE_PDL=False" as {"decode.MIN_SPLIT_TOKENS": 256, ...}."""
    switches: dict[str, object] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or key.count(".") != 1 or key.split(".")[0].strip() not in SWITCH_MODULES:
            raise SystemExit(
                f"--try {text!r}: each switch is MODULE.NAME=VALUE, MODULE one of {', '.join(SWITCH_MODULES)}, "
                "e.g. decode.MIN_SPLIT_TOKENS=256"
            )
        try:
            switches[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise SystemExit(
                f"--try {text!r}: {value.strip()!r} is not a Python literal (a number, True, ...)"
            ) from None
    return switches
