"""What `pdserve bench kernels` reports: a row per kernel and shape, printed as it is
measured and again as one Markdown table under the ceilings of the run."""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.bench.table import format_table, markdown_row

TOLERANCE = 1e-2  # relative error against the torch reference above which a kernel fails

_HEADER = [
    "kernel        ",
    "shape                     ",
    "cache   ",
    "  time µs",
    "achieved       ",
    "of ceil",
    "baseline µs         ",
    "speedup",
    "rel err",
    "notes",
]
_ALIGN = "lllrrrrrrl"


@dataclass
class Row:
    kernel: str
    shape: str
    cache: str
    time_us: float
    achieved: float
    unit: str
    fraction: float  # of the measured ceiling
    baseline: str
    baseline_us: float | None
    error: float
    notes: list[str] = field(default_factory=list)

    @property
    def speedup(self) -> float | None:
        return None if self.baseline_us is None else self.baseline_us / self.time_us

    @classmethod
    def failed(cls, kernel: str, shape: str, cache: str, exc: Exception) -> Row:
        """A case that raised: no figures, an infinite error, the exception as its note."""
        nan = float("nan")
        note = f"{type(exc).__name__}: {str(exc)[:100]}"
        return cls(kernel, shape, cache, nan, nan, "", nan, "", None, float("inf"), [note])


def _cells(r: Row) -> list[str]:
    base = f"{r.baseline_us:9.1f}" if r.baseline_us is not None else "        -"
    speed = f"{r.speedup:5.2f}x" if r.speedup is not None else "    - "
    return [
        f"{r.kernel:<14}",
        f"{r.shape:<26}",
        f"{r.cache:<8}",
        f"{r.time_us:9.1f}",
        f"{r.achieved:7.2f} {r.unit:<7}",
        f"{100 * r.fraction:5.1f}%",
        f"{r.baseline:<10} {base}",
        speed,
        f"{r.error:.1e}",
        "; ".join(r.notes),
    ]


def format_row(r: Row) -> str:
    return markdown_row(_cells(r))


def kernel_table(rows: list[Row], ceilings: dict[str, float], device_name: str) -> str:
    head = (
        f"device: {device_name}; ceilings measured in this run: copy {ceilings['copy_TBps']:.2f} TB/s, "
        f"bf16 matmul {ceilings['matmul_TFLOPs']:.0f} TFLOP/s\n\n"
    )
    return head + format_table(_HEADER, [_cells(r) for r in rows], _ALIGN)
