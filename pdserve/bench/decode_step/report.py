"""What `pdserve bench decode-step` reports: a row per batch size (graph replay, eager,
engine step, the floor and each variant), as one Markdown table under the run's setting."""

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


_HEADER = [
    "batch",
    "context",
    "weights + KV read GB",
    "floor ms",
    "graph step ms",
    "ratio",
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
    "HF generate tok/s",
    "engine vs HF",
]


def _ms(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "-"


def _cells(r: StepRow) -> list[str]:
    fused = (r.fused_graph_ms, r.fused_norm_graph_ms, r.fused_silu_graph_ms, r.fused_add_graph_ms)
    pdl = (r.no_pdl_graph_ms, r.prefetch_0_graph_ms, r.prefetch_16_graph_ms, r.prefetch_32_graph_ms)
    silu = (r.silu_gate_up_graph_ms, r.fused_add_silu_gate_up_graph_ms, r.rope_apart_graph_ms)
    hf = f"{r.hf_decode_tok_s:.0f}" if r.hf_decode_tok_s is not None else "-"
    engine_tok_s = r.batch / (r.engine_ms * 1e-3)
    vs_hf = f"{engine_tok_s / r.hf_decode_tok_s:.1f}x" if r.hf_decode_tok_s else "-"
    return [
        str(r.batch),
        str(r.context),
        f"{r.weight_gb:.2f} + {r.kv_gb:.2f}",
        f"{r.floor_ms:.3f}",
        _ms(r.graph_ms),
        f"{r.ratio:.3f}",
        f"{r.batch / (r.step_ms * 1e-3):.0f}",
        f"{r.engine_ms:.3f}",
        f"{engine_tok_s:.0f}",
        f"{r.eager_ms:.3f}",
        _ms(r.cublas_graph_ms),
        _ms(r.plain_layers_graph_ms),
        *(_ms(v) for v in (*fused, *pdl, *silu)),
        hf,
        vs_hf,
    ]


def step_table(rows: list[StepRow], bandwidth: float, device_name: str, args) -> str:
    head = (
        f"whole-model decode step: {args.model_config}, {args.dtype}, KV cache {args.kv_cache_dtype}; "
        f"device {device_name}; copy bandwidth {bandwidth / 1e12:.2f} TB/s measured in this run\n\n"
    )
    return head + format_table(_HEADER, [_cells(r) for r in rows], "r" * len(_HEADER))
