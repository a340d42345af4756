"""What `pdserve bench prefill` reports: a row per timed shape (B prompts of L tokens),
its time against the compute floor, as one Markdown table under the run's setting."""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.bench.table import format_table


@dataclass
class PrefillRow:
    prompts: int  # B prompts added at once
    prompt_len: int  # L tokens each
    steps: int  # engine steps from the first add to the last first token
    ms: float  # median wall time, adding the prompts to the last first token
    min_ms: float
    flops: float  # ModelCosts.prefill_flops(L, B)
    attention_flops: float  # the causal attention part of it
    floor_ms: float  # flops at the matmul rates measured in this run
    fp8_flops: float = 0  # the part fp8 linears run (--quantization fp8), at the fp8 rate

    @property
    def ratio(self) -> float:
        return self.ms / self.floor_ms

    @property
    def tflops(self) -> float:
        return self.flops / (self.ms * 1e-3) / 1e12

    @property
    def mfu(self) -> float:
        """Achieved FLOP/s over the measured matmul rates (= floor / time; with fp8 linears,
        their FLOPs at the fp8 rate and the rest at the 16-bit one)."""
        return self.floor_ms / self.ms

    def as_dict(self) -> dict:
        return {**vars(self), "ratio": self.ratio, "tflops": self.tflops, "mfu": self.mfu}


_HEADER = [
    "prompts",
    "tokens each",
    "steps",
    "TFLOP",
    "attention share",
    "floor ms",
    "ms (median)",
    "ms (min)",
    "ratio",
    "TFLOP/s",
    "MFU",
]


def _cells(r: PrefillRow) -> list[str]:
    return [
        str(r.prompts),
        str(r.prompt_len),
        str(r.steps),
        f"{r.flops / 1e12:.4g}",
        f"{r.attention_flops / r.flops:.1%}",
        f"{r.floor_ms:.3f}",
        f"{r.ms:.3f}",
        f"{r.min_ms:.3f}",
        f"{r.ratio:.2f}",
        f"{r.tflops:.4g}",
        f"{r.mfu:.1%}",
    ]


def prefill_table(rows: list[PrefillRow], setting: str) -> str:
    return setting + "\n\n" + format_table(_HEADER, [_cells(r) for r in rows], "r" * len(_HEADER))
