"""What `pdserve bench decode-step` reports: a row per batch size (graph replay, eager,
engine step, the floor and each variant; for a mixture-of-experts model the experts read
and the all-experts floor), as one Markdown table under the run's setting."""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.bench.table import format_table


@dataclass
class StepRow:
    batch: int
    context: int
    graph_ms: float | None  # CUDA-graph replay of one step (forward + logits)
    eager_ms: float  # the same forward launched op by op
    engine_ms: float  # ModelRunner.execute: inputs, replay, sampling, tokens read back
    floor_ms: float  # weights (the experts uniform routing touches) + K/V at the copy bandwidth
    weight_gb: float
    kv_gb: float
    experts_uniform: float | None = None  # experts a layer the batch touches under uniform routing
    experts_measured: float | None = None  # ... that its tokens picked in one forward (layer mean)
    all_experts_floor_ms: float | None = None  # the floor reading every expert of every layer
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
    fp8_triton_graph_ms: float | None = None  # fp8 matmuls of <= 16 rows on the Triton small-M path
    hf_decode_tok_s: float | None = None
    hf_total_tok_s: float | None = None

    @property
    def step_ms(self) -> float:
        return self.graph_ms if self.graph_ms is not None else self.eager_ms

    @property
    def ratio(self) -> float:
        return self.step_ms / self.floor_ms

    @property
    def all_experts_ratio(self) -> float | None:
        return None if self.all_experts_floor_ms is None else self.step_ms / self.all_experts_floor_ms


_HEADER = [
    "batch",
    "context",
    "weights + KV read GB",
    "floor ms",
    "graph step ms",
    "ratio",
    "experts a layer (uniform / measured)",
    "all-experts floor ms",
    "ratio to it",
    "tok/s (graph)",
    "engine step ms",
    "tok/s (engine)",
    "eager step ms",
    "graph ms, cuBLAS matmuls",
    "graph ms, torch layers",
    "graph ms, fused norm+SiLU",
    "fused norm",
    "fused SiLU",
    "fused adds only",
    "graph ms, no PDL",
    "PDL, prefetch 0",
    "prefetch 16",
    "prefetch 32",
    "SiLU in gate_up epilogue",
    "fused adds + SiLU in gate_up",
    "RoPE + K/V write apart",
    "graph ms, fp8 Triton small-M",
    "HF generate tok/s",
    "engine vs HF",
]


def _ms(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "-"


def _cells(r: StepRow) -> list[str]:
    fused = (r.fused_graph_ms, r.fused_norm_graph_ms, r.fused_silu_graph_ms, r.fused_add_graph_ms)
    pdl = (r.no_pdl_graph_ms, r.prefetch_0_graph_ms, r.prefetch_16_graph_ms, r.prefetch_32_graph_ms)
    silu = (r.silu_gate_up_graph_ms, r.fused_add_silu_gate_up_graph_ms, r.rope_apart_graph_ms)
    fp8 = (r.fp8_triton_graph_ms,)
    hf = f"{r.hf_decode_tok_s:.0f}" if r.hf_decode_tok_s is not None else "-"
    engine_tok_s = r.batch / (r.engine_ms * 1e-3)
    vs_hf = f"{engine_tok_s / r.hf_decode_tok_s:.1f}x" if r.hf_decode_tok_s else "-"
    experts = "-"
    if r.experts_uniform is not None:
        measured = f"{r.experts_measured:.1f}" if r.experts_measured is not None else "-"
        experts = f"{r.experts_uniform:.1f} / {measured}"
    all_ratio = r.all_experts_ratio
    return [
        str(r.batch),
        str(r.context),
        f"{r.weight_gb:.2f} + {r.kv_gb:.2f}",
        f"{r.floor_ms:.3f}",
        _ms(r.graph_ms),
        f"{r.ratio:.3f}",
        experts,
        _ms(r.all_experts_floor_ms),
        f"{all_ratio:.3f}" if all_ratio is not None else "-",
        f"{r.batch / (r.step_ms * 1e-3):.0f}",
        f"{r.engine_ms:.3f}",
        f"{engine_tok_s:.0f}",
        f"{r.eager_ms:.3f}",
        _ms(r.cublas_graph_ms),
        _ms(r.plain_layers_graph_ms),
        *(_ms(v) for v in (*fused, *pdl, *silu, *fp8)),
        hf,
        vs_hf,
    ]


def step_table(rows: list[StepRow], bandwidth: float, device_name: str, args) -> str:
    weights = args.dtype if not args.quantization else f"{args.quantization} linears, the rest {args.dtype}"
    layers = f" ({args.num_layers} layers)" if args.num_layers else ""
    head = (
        f"whole-model decode step: {args.model_config}{layers}, {weights}, KV cache {args.kv_cache_dtype}; "
        f"device {device_name}; copy bandwidth {bandwidth / 1e12:.2f} TB/s measured in this run"
    )
    if any(r.all_experts_floor_ms is not None for r in rows):
        head += (
            "; floor: shared weights + the experts B tokens touch under uniform routing, "
            "E (1 - (1 - k/E)^B) a layer (k at batch 1)"
        )
    if args.quantization == "fp8" and device_name != "cpu":
        path = {
            "scaled_mm": "torch._scaled_mm (activations quantized per token)",
            "triton": "the Triton small-M matmul (weight-only, activations bf16)",
            "both": "torch._scaled_mm; the fp8 Triton small-M column with the Triton path",
        }[args.fp8_small_m]
        head += f"; fp8 matmuls of at most 16 rows through {path}"
    if args.quantization and device_name == "cpu":
        head += (
            "; on the CPU an fp8 weight is multiplied as a dequantized copy, so its floor is not its time's"
        )
    head += "\n\n"
    return head + format_table(_HEADER, [_cells(r) for r in rows], "r" * len(_HEADER))
