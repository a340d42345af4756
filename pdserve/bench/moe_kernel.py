"""`pdserve bench moe-kernel`: the Triton fused mixture-of-experts kernels
(common/models/fused_moe_triton.py) at Qwen3-30B-A3B's and Mixtral-8x7B's expert shapes,
against a per-expert loop of torch matmuls and against the floor the hardware allows.

For each model, weight format (bf16, fp8) and token count it times, as medians of
triton.testing.do_bench (CUDA events, warm-up, L2 flushed before every run):
- fused, graph: the whole fused_moe call (align, gate/up, down, the k-way sum) replayed
  from a CUDA graph, the way a decode step runs it;
- fused, eager: the same call launched from Python;
- loop: fused_moe_reference.fused_moe, one torch matmul pair per expert that has tokens
  (it reads the counts back, so eager only); fp8 rows run it on the bf16 weights, since
  torch has no grouped fp8 matmul;
- floor: the larger of the bytes the call must move (each expert that has a token read
  once, its scales with fp8; x read, the intermediate and the per-pair outputs written and
  read back, the result written) at the device-to-device copy bandwidth, and its FLOPs
  (6 T k H I) at the dense bf16 matmul rate, both measured in the same run.
Routing is a softmax top-k of random logits, so tokens spread over the experts about evenly;
the table counts the experts they touched. Each fused result is checked against the loop's
(on the dequantized weights for fp8): a relative error over TOLERANCE fails the run.

    pdserve bench moe-kernel [--models qwen3-30b-a3b,mixtral-8x7b] [--tokens 1,8,64,256,1024,4096]
                             [--weights bf16,fp8] [--json FILE]

--tiny runs a tiny shape in Triton's interpreter on CPU (it checks the command, not speed);
without it the benchmark needs a CUDA device.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ExpertShape:
    experts: int
    top_k: int
    hidden: int
    inter: int
    # Qwen3-MoE rounds routing weights to the model's dtype, Mixtral weights in fp32
    weights_in_model_dtype: bool


SHAPES = {
    "qwen3-30b-a3b": ExpertShape(128, 8, 2048, 768, True),
    "mixtral-8x7b": ExpertShape(8, 2, 4096, 14336, False),
}
TINY = ExpertShape(8, 2, 64, 32, True)
TINY_TOKENS = "1,5"
TOLERANCE = 2e-2  # relative error of the fused result against the loop's, both bf16


def add_moe_kernel_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--models",
        default=",".join(SHAPES),
        help=f"comma list of expert shapes to run, of {', '.join(SHAPES)}",
    )
    parser.add_argument(
        "--tokens", default="1,8,64,256,1024,4096", help="comma list of token counts T (rows of x)"
    )
    parser.add_argument(
        "--weights", default="bf16,fp8", help="comma list of expert weight formats: bf16, fp8"
    )
    parser.add_argument("--warmup-ms", type=float, default=25.0, help="warm-up per figure (do_bench)")
    parser.add_argument("--rep-ms", type=float, default=100.0, help="repetition time per figure (do_bench)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights, inputs and routing")
    parser.add_argument(
        "--json", dest="json_path", default=None, help="write the rows and ceilings here as JSON"
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help=f"one tiny shape (E={TINY.experts}, k={TINY.top_k}, H={TINY.hidden}, I={TINY.inter}), fp16, "
        "tokens 1 and 5; runs on CPU in Triton's interpreter: checks the command, not speed",
    )


@dataclass
class Row:
    model: str
    weights: str
    tokens: int
    experts_touched: int
    fused_graph_us: float | None
    fused_eager_us: float
    loop_us: float
    floor_us: float
    floor_kind: str  # "bytes" or "flops": which bound is larger
    error: float

    def cells(self) -> list[str]:
        graph = self.fused_graph_us
        best = graph if graph is not None else self.fused_eager_us
        return [
            self.model,
            self.weights,
            str(self.tokens),
            str(self.experts_touched),
            "-" if graph is None else f"{graph:.1f}",
            f"{self.fused_eager_us:.1f}",
            f"{self.loop_us:.1f}",
            f"{self.floor_us:.1f} ({self.floor_kind})",
            f"{100 * self.floor_us / best:.0f}%",
            f"{self.loop_us / best:.1f}x",
            f"{self.error:.1e}",
        ]


HEADER = [
    "model",
    "weights",
    "T",
    "experts touched",
    "fused, graph us",
    "fused, eager us",
    "loop us",
    "floor us",
    "floor / fused",
    "loop / fused",
    "rel. error",
]


def run_moe_kernel_bench(args: argparse.Namespace) -> int:
    """Print the table; 0 when every fused result matched the loop's, 1 otherwise, 2 when it cannot run here."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        if not args.tiny:
            print(
                "pdserve bench moe-kernel needs a CUDA device; on CPU only --tiny runs (in Triton's interpreter)",
                file=sys.stderr,
            )
            return 2
        if not _interpreter_on():
            print(
                "triton was imported before its interpreter could be switched on; run with TRITON_INTERPRET=1",
                file=sys.stderr,
            )
            return 2
    if args.tiny:
        shapes, tokens = {"tiny": TINY}, [int(t) for t in TINY_TOKENS.split(",")]
    else:
        unknown = [m for m in args.models.split(",") if m not in SHAPES]
        if unknown:
            print(f"--models: unknown {unknown}; known: {', '.join(SHAPES)}", file=sys.stderr)
            return 2
        shapes = {m: SHAPES[m] for m in args.models.split(",") if m}
        tokens = [int(t) for t in args.tokens.split(",") if t]
    formats = [w for w in args.weights.split(",") if w]
    if any(w not in ("bf16", "fp8") for w in formats):
        print(f"--weights {args.weights!r}: each must be bf16 or fp8", file=sys.stderr)
        return 2
    bench = MoeKernelBench(args, device)
    rows = [row for name, shape in shapes.items() for row in bench.run_shape(name, shape, tokens, formats)]
    from pdserve.bench.table import format_table

    print()
    print(format_table(HEADER, [r.cells() for r in rows], "llrrrrrrrrr"))
    print(
        f"\nceilings measured in this run: copy {bench.copy_bw / 1e9:.0f} GB/s (read + write), "
        f"dense {bench.dtype_name} matmul {bench.matmul_flops / 1e12:.1f} TFLOP/s; {bench.device_name}"
    )
    if not bench.cuda:
        print("--tiny on CPU: the bf16 rows run fp16, since the interpreter's tl.dot is wrong on bf16")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(
                {
                    "device": bench.device_name,
                    "copy_GBps": bench.copy_bw / 1e9,
                    "matmul_TFLOPs": bench.matmul_flops / 1e12,
                    "rows": [asdict(r) for r in rows],
                },
                f,
                indent=1,
            )
    failed = [r for r in rows if not r.error < TOLERANCE]
    for r in failed:
        print(
            f"MISMATCH {r.model} {r.weights} T={r.tokens}: relative error {r.error:.2e} > {TOLERANCE}",
            file=sys.stderr,
        )
    return 1 if failed else 0


def _interpreter_on() -> bool:
    """Switch Triton's interpreter on unless triton is already imported; whether it is on."""
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
    import triton

    return bool(triton.knobs.runtime.interpret)


class MoeKernelBench:
    def __init__(self, args: argparse.Namespace, device) -> None:
        import torch

        from pdserve.bench.timing import copy_bandwidth, matmul_rate, time_ms

        self.args = args
        self.device = device
        self.cuda = device.type == "cuda"
        # the interpreter's tl.dot is wrong on bf16, so the CPU check runs fp16
        self.dtype = torch.bfloat16 if self.cuda else torch.float16
        self.dtype_name = "bf16" if self.cuda else "fp16"
        self.device_name = torch.cuda.get_device_name(device) if self.cuda else "cpu (Triton interpreter)"

        def timer(fn) -> float:
            return time_ms(fn, device, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, host_repeats=3)

        self.timer = timer
        self.copy_bw = copy_bandwidth(device, timer, cpu_bytes=1 << 22)
        self.matmul_flops = matmul_rate(
            device, self.dtype, timer, 8192 if self.cuda else 256, 3 if self.cuda else 1
        )

    def run_shape(self, name: str, shape: ExpertShape, tokens: list[int], formats: list[str]) -> list[Row]:
        import torch

        from common.models.fp8_weights import quantize_rows

        g = torch.Generator(device=self.device).manual_seed(self.args.seed)
        e, h, i = shape.experts, shape.hidden, shape.inter
        w13 = (torch.randn(e, 2 * i, h, generator=g, device=self.device) / h**0.5).to(self.dtype)
        w2 = (torch.randn(e, h, i, generator=g, device=self.device) / i**0.5).to(self.dtype)
        rows = []
        for fmt in formats:
            if fmt == "fp8":  # quantized an expert at a time, as the loader does
                q13, s13 = zip(*(quantize_rows(w13[x]) for x in range(e)), strict=True)
                q2, s2 = zip(*(quantize_rows(w2[x]) for x in range(e)), strict=True)
                weights = (torch.stack(q13), torch.stack(q2), torch.stack(s13), torch.stack(s2))
                checked = tuple(
                    (q.float() * s[..., None]).to(self.dtype)
                    for q, s in zip(weights[:2], weights[2:], strict=True)
                )
            else:
                weights, checked = (w13, w2, None, None), (w13, w2)
            for t in tokens:
                rows.append(self.run_case(name, shape, fmt, t, weights, checked, g))
                print(" | ".join(rows[-1].cells()), flush=True)
            del weights, checked
        return rows

    def run_case(self, name, shape: ExpertShape, fmt: str, tokens: int, weights, checked, g) -> Row:
        import torch

        from common.models import fused_moe_reference as reference
        from common.models import fused_moe_triton as kernels
        from pdserve.bench.timing import capture_graph

        w13, w2, s13, s2 = weights
        x = torch.randn(tokens, shape.hidden, generator=g, device=self.device).to(self.dtype)
        logits = torch.randn(tokens, shape.experts, generator=g, device=self.device)
        topk_weights, ids = reference.select_experts(logits, shape.top_k, renormalize=True)
        if shape.weights_in_model_dtype:
            topk_weights = topk_weights.to(self.dtype)

        def fused():
            return kernels.fused_moe(x, w13, w2, topk_weights, ids, s13, s2)

        def loop():
            return reference.fused_moe(x, checked[0], checked[1], topk_weights, ids)

        expected = loop().double()
        error = float((fused().double() - expected).norm() / expected.norm().clamp_min(1e-30))
        graph_us = None
        if self.cuda:
            graph = capture_graph(fused)
            graph_us = 1e3 * self.timer(graph.replay)
            del graph
        eager_us = 1e3 * self.timer(fused)
        loop_us = 1e3 * self.timer(loop)
        touched = int(ids.unique().numel())
        floor_us, kind = self.floor_us(shape, fmt, tokens, touched)
        return Row(name, fmt, tokens, touched, graph_us, eager_us, loop_us, floor_us, kind, error)

    def floor_us(self, shape: ExpertShape, fmt: str, tokens: int, touched: int) -> tuple[float, str]:
        """(the larger of the bytes and FLOPs bounds in us, which one)."""
        h, i, pairs = shape.hidden, shape.inter, tokens * shape.top_k
        weight_bytes = 1 if fmt == "fp8" else 2
        expert = 3 * h * i * weight_bytes + ((2 * i + h) * 4 if fmt == "fp8" else 0)
        act = 2 * (tokens * h + 2 * pairs * i + 2 * pairs * h + tokens * h)
        bytes_us = 1e6 * (touched * expert + act) / self.copy_bw
        flops_us = 1e6 * 6 * pairs * h * i / self.matmul_flops
        return (bytes_us, "bytes") if bytes_us >= flops_us else (flops_us, "flops")
