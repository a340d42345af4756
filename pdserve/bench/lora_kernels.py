"""`pdserve bench lora-kernels`: the Triton LoRA kernels (common/lora/lora_ops_triton.py) at
Llama-3-8B's shapes against the torch reference, a per-request loop and the base layers.

For each case (REQUESTS x TOKENS_PER_REQUEST : ADAPTERS; request i uses adapter i mod
ADAPTERS, its tokens contiguous in the batch as the engine packs them) and each of a
decoder layer's four LoRA linears (qkv, o, gate_up, down) it times
- Triton: lora_shrink + lora_expand_add, replayed from a CUDA graph (the way the engine
  runs a decode step) and called eagerly;
- torch ref: lora_ops.py, one matmul pair per adapter of the step (eager only: it reads
  each adapter's scale on the host);
- naive: a server without batched LoRA, each request on its own: x_req @ A^T, then
  y_req[band] += scale * (band of it) @ B_band^T, one addmm per band (graph replay);
- base: the base layer's F.linear of the same x (graph replay);
each a median of triton.testing.do_bench (L2 flushed before every run), and the Triton
path's fewest bytes (x, each used adapter's A and B once, shrunk written and read, y read
and written) over its time against the device-to-device copy bandwidth measured in the run.
Then a whole layer, its four linears captured in one graph: base alone, base + Triton LoRA,
base + naive LoRA, and the same times 32 layers.

    pdserve bench lora-kernels [--cases 64x1:8,1x1:1,8x256:8] [--rank 16] [--tune] [--baseline FILE]

--tune also sweeps the kernels' tiles (the heuristics in lora_ops_triton.py come from it);
--baseline FILE times another version of lora_ops_triton.py (say `git show
REV:common/lora/lora_ops_triton.py > FILE`) against this one in the same process, so a
change to the kernels is measured before and after on one card;
--smoke runs SmolLM2's shapes in Triton's interpreter on CPU (checks the command, not speed).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from functools import partial

# name -> (in_features, output band boundaries): Llama-3-8B (hidden 4096, intermediate 14336,
# 32 query and 8 KV heads of 128) and SmolLM2-135M (576, 1536, 9 and 3 heads of 64)
LLAMA3_8B = {
    "qkv": (4096, (0, 4096, 5120, 6144)),
    "o": (4096, (0, 4096)),
    "gate_up": (4096, (0, 14336, 28672)),
    "down": (14336, (0, 4096)),
}
SMOLLM2 = {
    "qkv": (576, (0, 576, 768, 960)),
    "o": (576, (0, 576)),
    "gate_up": (576, (0, 1536, 3072)),
    "down": (1536, (0, 576)),
}
TOLERANCE = 2e-2  # relative error of the Triton delta against the torch reference's, both bf16


def add_lora_kernels_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cases",
        default="64x1:8,1x1:1,8x256:8",
        help="comma list of REQUESTSxTOKENS:ADAPTERS, e.g. 64x1:8 (decode of 64 requests over 8 adapters)",
    )
    parser.add_argument("--rank", type=int, default=16, help="adapter rank (= --max-lora-rank, R)")
    parser.add_argument(
        "--max-loras", type=int, default=8, help="device slots S (at least every case's ADAPTERS)"
    )
    parser.add_argument("--layers", type=int, default=32, help="decoder layers a step runs (Llama-3-8B: 32)")
    parser.add_argument("--warmup-ms", type=float, default=25.0, help="warm-up per figure (do_bench)")
    parser.add_argument("--rep-ms", type=float, default=100.0, help="repetition time per figure (do_bench)")
    parser.add_argument("--tune", action="store_true", help="also sweep the kernels' tile configs")
    parser.add_argument(
        "--baseline",
        metavar="FILE",
        help="another lora_ops_triton.py (e.g. from git show REV:common/lora/lora_ops_triton.py) to time "
        "against this one, alternately, in the same process",
    )
    parser.add_argument("--smoke", action="store_true", help="SmolLM2 shapes, tiny cases, CPU interpreter")


@dataclass(frozen=True)
class Case:
    requests: int
    tokens_per_request: int
    adapters: int

    @property
    def tokens(self) -> int:
        return self.requests * self.tokens_per_request

    @property
    def name(self) -> str:
        return f"{self.requests}x{self.tokens_per_request}:{self.adapters}"

    @staticmethod
    def parse(text: str) -> Case:
        shape, _, adapters = text.partition(":")
        requests, _, per_request = shape.partition("x")
        return Case(int(requests), int(per_request), int(adapters or 1))


def run_lora_kernels(args: argparse.Namespace) -> int:
    """Print the tables; 0 when every Triton result matched the torch reference."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        if not args.smoke:
            print("pdserve bench lora-kernels needs a CUDA device; on CPU only --smoke runs", file=sys.stderr)
            return 2
        os.environ.setdefault("TRITON_INTERPRET", "1")
        import triton

        if not triton.knobs.runtime.interpret:
            print("triton was imported before its interpreter could be switched on", file=sys.stderr)
            return 2
    cases = [Case.parse(c) for c in args.cases.split(",") if c]
    if args.smoke:
        cases = [Case(3, 1, 2), Case(2, 5, 2)]
    bad = [c.name for c in cases if c.adapters > args.max_loras]
    if bad:
        print(f"cases {bad} use more adapters than --max-loras {args.max_loras}", file=sys.stderr)
        return 2
    bench = LoRAKernelBench(args, device)
    return bench.run(cases)


class LoRAKernelBench:
    def __init__(self, args: argparse.Namespace, device) -> None:
        import torch

        from pdserve.bench.timing import copy_bandwidth, time_ms

        self.args = args
        self.device = device
        self.dtype = torch.float16 if args.smoke else torch.bfloat16  # the interpreter's dot is wrong on bf16
        self.modules = SMOLLM2 if args.smoke else LLAMA3_8B

        def timer(fn) -> float:
            return time_ms(fn, device, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, host_repeats=3)

        self.timer = timer
        from common.lora import lora_ops_triton

        self.kernels = lora_ops_triton
        self.copy_bw = copy_bandwidth(device, timer, cpu_bytes=1 << 22)
        g = torch.Generator(device=device).manual_seed(0)
        r, s = args.rank, args.max_loras
        # per module: base weight [out, in], A [S, nR, in], B [S, out, R], scales [S]
        self.weights = {}
        for name, (k, bands) in self.modules.items():
            n, out = len(bands) - 1, bands[-1]
            self.weights[name] = (
                (torch.randn(out, k, generator=g, device=device) / k**0.5).to(self.dtype),
                (torch.randn(s, n * r, k, generator=g, device=device) / k**0.5).to(self.dtype),
                (torch.randn(s, out, r, generator=g, device=device) / r**0.5).to(self.dtype),
                torch.rand(s, generator=g, device=device) + 0.5,
            )

    def run(self, cases: list[Case]) -> int:
        import torch

        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu (interpreter)"
        print(f"device: {name}; copy bandwidth {self.copy_bw / 1e9:.0f} GB/s (read + write)")
        print(f"rank {self.args.rank}, {self.args.max_loras} slots, {self.dtype}, medians of do_bench")
        errors = []
        tables = []
        for case in cases:
            rows, layer_rows, error = self.run_case(case)
            errors.append((case.name, error))
            tables.append((case, rows, layer_rows))
        from pdserve.bench.table import format_table

        print()
        header = [
            "case",
            "module",
            "Triton, graph us",
            "Triton eager us",
            "Triton GB/s (% of copy)",
            "torch ref us",
            "naive us",
            "base us",
        ]
        print(format_table(header, [row for _, rows, _ in tables for row in rows], "llrrrrrr"))
        print()
        header = [
            "case",
            "one layer, graph",
            "base us",
            "base + Triton LoRA us",
            "base + naive LoRA us",
            "(base + Triton LoRA) / base",
        ]
        print(format_table(header, [row for _, _, rows in tables for row in rows], "llrrrr"))
        print()
        for case_name, error in errors:
            print(
                f"{case_name}: largest relative error of the Triton delta against the torch reference {error:.1e}"
            )
        if self.args.baseline:
            self.compare(cases, self.args.baseline)
        if self.args.tune and self.device.type == "cuda":
            self.tune(cases)
        failed = [c for c, e in errors if not e < TOLERANCE]
        if failed:
            print(f"MISMATCH in {failed}: relative error over {TOLERANCE}", file=sys.stderr)
        return 1 if failed else 0

    def batch(self, case: Case):
        """The case's LoRABatch: request i's tokens on slot i mod ADAPTERS."""
        import torch

        from common.lora.lora_ops import LoRABatch

        slots = torch.arange(case.requests, device=self.device).remainder(case.adapters)
        token_slots = slots.repeat_interleave(case.tokens_per_request).to(torch.int32)
        order = torch.argsort(token_slots, stable=True)
        counts = torch.bincount(token_slots.long(), minlength=self.args.max_loras)
        starts = torch.zeros(self.args.max_loras + 1, dtype=torch.int32, device=self.device)
        starts[1:] = counts.cumsum(0)
        groups = [
            (slot, self.args.rank, order[int(starts[slot]) : int(starts[slot + 1])])
            for slot in range(self.args.max_loras)
            if counts[slot] > 0
        ]
        return LoRABatch(token_slots, order.to(torch.int32), starts, groups)

    def bytes_moved(self, case: Case, name: str) -> int:
        """The Triton path's fewest bytes: x, each used adapter's A and B, shrunk written and
        read, y read and written."""
        k, bands = self.modules[name]
        n, out, r, t = len(bands) - 1, bands[-1], self.args.rank, case.tokens
        e = 2  # bf16
        return e * (t * k + case.adapters * n * r * k + 2 * t * n * r + case.adapters * out * r + 2 * t * out)

    def run_case(self, case: Case):
        import torch
        import torch.nn.functional as F

        from common.lora import lora_ops as reference
        from pdserve.bench.timing import capture_graph

        kernels = self.kernels
        batch = self.batch(case)
        t = case.tokens
        cuda = self.device.type == "cuda"
        xs = {
            name: torch.randn(t, k, device=self.device).to(self.dtype)
            for name, (k, _) in self.modules.items()
        }
        ys = {
            name: torch.randn(t, b[-1], device=self.device).to(self.dtype)
            for name, (_, b) in self.modules.items()
        }
        host_scales = {name: w[3].tolist() for name, w in self.weights.items()}
        requests = [
            (i * case.tokens_per_request, (i + 1) * case.tokens_per_request, i % case.adapters)
            for i in range(case.requests)
        ]

        def triton_lora(name):
            _, a, b, scales = self.weights[name]
            bands = self.modules[name][1]
            shrunk = kernels.lora_shrink(xs[name], a, batch, len(bands) - 1)
            kernels.lora_expand_add(ys[name], shrunk, b, scales, bands, batch)

        def reference_lora(name):
            _, a, b, scales = self.weights[name]
            bands = self.modules[name][1]
            shrunk = reference.lora_shrink(xs[name], a, batch, len(bands) - 1)
            reference.lora_expand_add(ys[name], shrunk, b, scales, bands, batch)

        def naive_lora(name):
            _, a, b, _ = self.weights[name]
            bands = self.modules[name][1]
            r, x, y = self.args.rank, xs[name], ys[name]
            for lo, hi, slot in requests:
                d = x[lo:hi] @ a[slot].T
                for j in range(len(bands) - 1):
                    y[lo:hi, bands[j] : bands[j + 1]].addmm_(
                        d[:, j * r : (j + 1) * r],
                        b[slot, bands[j] : bands[j + 1]].T,
                        alpha=host_scales[name][slot],
                    )

        def base(name):
            return F.linear(xs[name], self.weights[name][0])

        # correctness first: the Triton delta against the reference's, from the same y
        error = 0.0
        for name in self.modules:
            y0 = ys[name].clone()
            reference_lora(name)
            expected = ys[name].float() - y0.float()
            ys[name].copy_(y0)
            triton_lora(name)
            got = ys[name].float() - y0.float()
            error = max(error, float((got - expected).norm() / expected.norm()))

        def graph_ms(fn) -> float:
            return self.timer(capture_graph(fn).replay) if cuda else self.timer(fn)

        rows = []
        sums = [0.0] * 6
        for name in self.modules:
            figures = [
                graph_ms(lambda n=name: triton_lora(n)),
                self.timer(lambda n=name: triton_lora(n)),
                self.timer(lambda n=name: reference_lora(n)),
                graph_ms(lambda n=name: naive_lora(n)),
                graph_ms(lambda n=name: base(n)),
            ]
            gbs = self.bytes_moved(case, name) / (figures[0] * 1e-3) / 1e9
            sums = [s + f for s, f in zip(sums, figures + [self.bytes_moved(case, name)], strict=True)]
            rows.append(
                [
                    case.name,
                    name,
                    _us(figures[0]),
                    _us(figures[1]),
                    f"{gbs:.0f} ({100 * gbs * 1e9 / self.copy_bw:.0f}%)",
                ]
                + [_us(f) for f in figures[2:]]
            )
        layer_gbs = sums[5] / (sums[0] * 1e-3) / 1e9
        rows.append(
            [
                case.name,
                "layer (4 linears)",
                _us(sums[0]),
                _us(sums[1]),
                f"{layer_gbs:.0f} ({100 * layer_gbs * 1e9 / self.copy_bw:.0f}%)",
            ]
            + [_us(f) for f in sums[2:5]]
        )
        layers = self.args.layers
        rows.append(
            [case.name, f"x {layers} layers (ms)", _ms(sums[0] * layers), _ms(sums[1] * layers), ""]
            + [_ms(f * layers) for f in sums[2:5]]
        )

        def layer(lora):
            def step():
                for name in self.modules:
                    base(name)
                    if lora is not None:
                        lora(name)

            return step

        base_ms, tri_ms, naive_ms = (graph_ms(layer(lora)) for lora in (None, triton_lora, naive_lora))
        layer_rows = [
            [case.name, "1 layer", _us(base_ms), _us(tri_ms), _us(naive_ms), f"{tri_ms / base_ms:.3f}x"],
            [
                case.name,
                f"{layers} layers (ms)",
                _ms(base_ms * layers),
                _ms(tri_ms * layers),
                _ms(naive_ms * layers),
                "",
            ],
        ]
        return rows, layer_rows, error

    def compare(self, cases: list[Case], baseline_file: str) -> None:
        """Per case, the Triton LoRA of the four linears (each in its own graph, summed) and a
        whole layer in one graph, for the baseline file's kernels and this tree's, alternating
        twice (the spread between a version's two rounds is the noise)."""
        import importlib.util
        import sys

        from pdserve.bench.table import format_table

        spec = importlib.util.spec_from_file_location("lora_ops_triton_baseline", baseline_file)
        if spec is None or spec.loader is None:
            raise ValueError(f"--baseline {baseline_file}: not a Python file")
        baseline = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = baseline  # dataclasses look their module up there
        spec.loader.exec_module(baseline)
        current = self.kernels
        rows = []
        for case in cases:
            for round_ in (1, 2):
                for label, module in (("baseline", baseline), ("this tree", current)):
                    linears, base_ms, lora_ms = self.layer_times(case, module)
                    rows.append(
                        [
                            case.name,
                            f"{label} ({round_})",
                            _us(linears),
                            _us(base_ms),
                            _us(lora_ms),
                            _us(lora_ms - base_ms),
                            f"{lora_ms / base_ms:.3f}x",
                        ]
                    )
        print()
        print(f"--baseline {baseline_file} against this tree's kernels, graph replays:")
        header = [
            "case",
            "kernels (round)",
            "4 linears' LoRA us",
            "layer base us",
            "base + LoRA us",
            "LoRA in the layer us",
            "ratio",
        ]
        print(format_table(header, rows, "llrrrrr"))

    def layer_times(self, case: Case, kernels) -> tuple[float, float, float]:
        """(the four linears' LoRA, each replayed from its own graph, summed; the base layer;
        base + LoRA layer), in ms, with `kernels` as the Triton module."""
        import torch
        import torch.nn.functional as F

        from pdserve.bench.timing import capture_graph

        batch = self.batch(case)
        xs = {
            n: torch.randn(case.tokens, k, device=self.device).to(self.dtype)
            for n, (k, _) in self.modules.items()
        }
        ys = {
            n: torch.randn(case.tokens, b[-1], device=self.device).to(self.dtype)
            for n, (_, b) in self.modules.items()
        }

        def lora(name):
            _, a, b, scales = self.weights[name]
            bands = self.modules[name][1]
            shrunk = kernels.lora_shrink(xs[name], a, batch, len(bands) - 1)
            kernels.lora_expand_add(ys[name], shrunk, b, scales, bands, batch)

        def layer(with_lora: bool):
            for name in self.modules:
                F.linear(xs[name], self.weights[name][0])
                if with_lora:
                    lora(name)

        def graph_ms(fn) -> float:
            return self.timer(capture_graph(fn).replay) if self.device.type == "cuda" else self.timer(fn)

        linears = sum(graph_ms(lambda n=name: lora(n)) for name in self.modules)
        return linears, graph_ms(lambda: layer(False)), graph_ms(lambda: layer(True))

    def tune(self, cases: list[Case]) -> None:
        """Sweep tile configs of each kernel, each replayed from a graph; print every config's
        time beside the heuristic's, row by row (a run cut short keeps what it measured)."""
        import torch

        from common.attention.triton_paged_tiles import num_sms
        from pdserve.bench.table import format_table, markdown_row
        from pdserve.bench.timing import capture_graph

        kernels = self.kernels

        print()
        print(format_table(["case", "kernel", "config", "graph us"], [], "lllr"))
        sms = num_sms(self.device)
        for case in cases:
            if case.tokens == 1:
                continue
            batch = self.batch(case)
            t = case.tokens
            decode = t <= 128
            for name in ("qkv", "down"):
                k, bands = self.modules[name]
                _, a, _, _ = self.weights[name]
                x = torch.randn(t, k, device=self.device).to(self.dtype)
                default = kernels.shrink_config(t, a.shape[1], k, sms)
                configs = {default}
                for block_m in [16] if decode else [32, 64]:
                    for split in [1, 4, 16, 32] if decode else [1, 4, 8]:
                        configs.add(kernels.ShrinkConfig(block_m, default.block_n, default.block_k, split))
                for cfg in sorted(configs, key=lambda c: (c.block_m, c.block_k, c.split_k)):
                    ms = self.timer(capture_graph(partial(kernels.lora_shrink_with, x, a, batch, cfg)).replay)
                    mark = " (default)" if cfg == default else ""
                    print(
                        markdown_row([case.name, f"shrink {name}", _config(cfg) + mark, _us(ms)]), flush=True
                    )
            for name in ("o", "gate_up"):
                k, bands = self.modules[name]
                _, a, b, scales = self.weights[name]
                y = torch.randn(t, bands[-1], device=self.device).to(self.dtype)
                shrunk = torch.randn(t, a.shape[1], device=self.device).to(self.dtype)
                default = kernels.expand_config(t)
                configs = {default}
                for block_m in [16] if decode else [32, 64]:
                    for block_n in (64, 128, 256):
                        warps = 8 if block_m * block_n >= 16384 else 4
                        configs.add(kernels.ExpandConfig(block_m, block_n, warps))
                for cfg in sorted(configs, key=lambda c: (c.block_m, c.block_n, c.num_warps)):
                    expand = partial(kernels.lora_expand_add_with, y, shrunk, b, scales, bands, batch, cfg)
                    ms = self.timer(capture_graph(expand).replay)
                    mark = " (default)" if cfg == default else ""
                    print(
                        markdown_row([case.name, f"expand {name}", _config(cfg) + mark, _us(ms)]), flush=True
                    )


def _config(cfg) -> str:
    return " ".join(f"{k}={v}" for k, v in vars(cfg).items())


def _us(ms: float) -> str:
    return f"{ms * 1e3:.1f}"


def _ms(ms: float) -> str:
    return f"{ms:.2f}"
