"""`pdserve bench kernels`: check each attention kernel against its reference, then time it.

For every shape it prints the median time, the achieved bandwidth (decode, write_kv) or
TFLOP/s (prefill), that figure as a fraction of the ceiling measured in the same run
(device-to-device copy bandwidth, counting bytes read and written; a bf16 8192³ matrix
product), and the time of a baseline on the equivalent contiguous problem: torch SDPA's
flash kernel for attention, the torch reference for write_kv. Times come from
triton.testing.do_bench (CUDA events, warm-up, L2 flushed before each run, median) over
CUDA-graph replays of each kernel and baseline, so host launch cost stays out.

Decode rows also time the chunked-prefill kernel on the same batch ("unified" rows): the
measurement behind serving decode with a kernel of its own.

Shapes default to Llama-3-8B attention: 32 query / 8 KV heads, head dim 128, block 16.
Only torch, triton and numpy are needed, so it runs on a bare GPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from common.attention.paged_batch import PagedBatch, make_paged_batch, reference_error, relative_error

TOLERANCE = 1e-2
DEFAULT_PREFILL_CASES = "1x512+0,1x512+3584,1x2048+0,1x2048+2048,1x2048+6144,8x2048+0,4x512+2048"
SMOKE_PREFILL_CASES = "2x20+0,1x33+40"
CACHE_DTYPES = {"auto": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp8": torch.float8_e4m3fn}


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


def add_kernel_bench_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtype", default="bfloat16", choices=["bfloat16", "float16"], help="query/output dtype"
    )
    parser.add_argument(
        "--kv-cache-dtypes",
        default="auto,fp8",
        help="comma list of cache dtypes to run: auto (= --dtype), fp8",
    )
    parser.add_argument("--decode-batch-sizes", default="1,8,64,256")
    parser.add_argument("--decode-context-lens", default="512,2048,8192")
    parser.add_argument(
        "--decode-extra",
        default="64x4096",
        help="extra decode shapes BATCHxCONTEXT, comma list ('' for none)",
    )
    parser.add_argument(
        "--prefill-cases",
        default=DEFAULT_PREFILL_CASES,
        help="comma list of REQUESTSxNEW_TOKENS+PREFIX, e.g. 8x2048+0 (8 prompts of 2048 tokens)",
    )
    parser.add_argument("--num-q-heads", type=int, default=32)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--warmup-ms", type=float, default=25.0)
    parser.add_argument("--rep-ms", type=float, default=100.0)
    parser.add_argument(
        "--no-unified", action="store_true", help="skip timing decode through the prefill kernel"
    )
    parser.add_argument(
        "--tune", action="store_true", help="also sweep kernel configs and decode split counts"
    )
    parser.add_argument(
        "--tune-sections",
        default="decode,decode-fp8,splits,prefill,prefill-fp8",
        help="which sweeps --tune runs",
    )
    parser.add_argument("--skip-table", action="store_true", help="with --tune: run the sweeps only")
    parser.add_argument("--json", dest="json_path", default=None, help="write the rows here as JSON")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny shapes only (runs on CPU in Triton's interpreter): checks the command, not speed",
    )


def run_kernel_bench(args: argparse.Namespace) -> int:
    """Run the kernel benchmark; 0 when every kernel matched its reference, 1 otherwise."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        if not args.smoke:
            print(
                "pdserve bench kernels needs a CUDA device; on CPU only --smoke runs (in Triton's interpreter)",
                file=sys.stderr,
            )
            return 2
        _enter_triton_interpreter()
    if args.smoke:
        args.decode_batch_sizes, args.decode_context_lens, args.decode_extra = "1,3", "40", ""
        args.prefill_cases = SMOKE_PREFILL_CASES
        args.num_q_heads, args.num_kv_heads, args.head_dim, args.block_size = 4, 2, 32, 8
        args.dtype = "float16"  # the interpreter's tl.dot is wrong on bf16
        if device.type == "cpu":
            # the interpreter rounds some values to e4m3 a binade low, so fp8 stores are
            # checked on the GPU only
            args.kv_cache_dtypes = "auto"
    bench = KernelBench(args, device)
    rows = bench.run()
    print()
    print(
        format_table(
            rows, bench.ceilings, torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        )
    )
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(
                {"ceilings": bench.ceilings, "rows": [asdict(r) | {"speedup": r.speedup} for r in rows]},
                f,
                indent=1,
            )
    failed = [r for r in rows if not r.error < TOLERANCE]
    for r in failed:
        print(
            f"MISMATCH {r.kernel} {r.shape} {r.cache}: relative error {r.error:.2e} > {TOLERANCE}",
            file=sys.stderr,
        )
    return 1 if failed else 0


def _enter_triton_interpreter() -> None:
    if "triton" in sys.modules:
        import triton

        if not triton.knobs.runtime.interpret:
            raise RuntimeError(
                "triton was imported before interpreter mode could be set; run with TRITON_INTERPRET=1"
            )
        return
    os.environ["TRITON_INTERPRET"] = "1"


class KernelBench:
    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args = args
        self.device = device
        self.dtype = getattr(torch, args.dtype)
        self.ceilings: dict[str, float] = {}
        self.baseline = "sdpa flash" if device.type == "cuda" else "sdpa (cpu)"

    # ------------------------------------------------------------ timing

    def time_ms(self, fn, graph: bool = True) -> float:
        """Median milliseconds of fn; on CUDA, of a CUDA-graph replay of it when graph is set.

        Replaying a graph keeps the host's launch cost (tens of µs for a Triton launch from
        Python) out of the figure, as in a served decode step; do_bench flushes L2 before
        each replay, so small problems are not timed from the cache.
        """
        if self.device.type == "cuda":
            import triton.testing

            if graph:
                fn = self.capture(fn).replay
            return triton.testing.do_bench(
                fn, warmup=self.args.warmup_ms, rep=self.args.rep_ms, return_mode="median"
            )
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    @staticmethod
    def capture(fn) -> torch.cuda.CUDAGraph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up (compile, allocate) outside the capture
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph

    def measure_ceilings(self) -> None:
        n = (1 << 30) if self.device.type == "cuda" else (1 << 24)  # bytes
        src = torch.randn(n // 2, device=self.device, dtype=torch.bfloat16)
        dst = torch.empty_like(src)
        ms = self.time_ms(lambda: dst.copy_(src), graph=False)
        self.ceilings["copy_TBps"] = 2 * n / (ms * 1e-3) / 1e12
        m = 8192 if self.device.type == "cuda" else 256
        a = torch.randn(m, m, device=self.device, dtype=torch.bfloat16)
        b = torch.randn(m, m, device=self.device, dtype=torch.bfloat16)
        ms = self.time_ms(lambda: a @ b, graph=False)
        self.ceilings["matmul_TFLOPs"] = 2 * m**3 / (ms * 1e-3) / 1e12
        print(
            f"ceilings: copy {self.ceilings['copy_TBps']:.2f} TB/s (read + write), "
            f"bf16 matmul {self.ceilings['matmul_TFLOPs']:.0f} TFLOP/s",
            flush=True,
        )

    # ------------------------------------------------------------ shapes

    def batch(self, query_lens, seq_lens, cache_dtype, seed=0) -> PagedBatch:
        a = self.args
        return make_paged_batch(
            query_lens,
            seq_lens,
            num_q_heads=a.num_q_heads,
            num_kv_heads=a.num_kv_heads,
            head_dim=a.head_dim,
            block_size=a.block_size,
            dtype=self.dtype,
            cache_dtype=cache_dtype,
            num_layers=1,
            layer=0,
            device=self.device,
            seed=seed,
            spare_blocks=1,
        )

    def cache_dtypes(self) -> list[tuple[str, torch.dtype]]:
        out = []
        for name in self.args.kv_cache_dtypes.split(","):
            dtype = CACHE_DTYPES[name.strip()] or self.dtype
            out.append(("fp8" if dtype == torch.float8_e4m3fn else str(dtype).removeprefix("torch."), dtype))
        return out

    def decode_shapes(self) -> list[tuple[int, int]]:
        a = self.args
        shapes = [
            (int(b), int(c))
            for b in a.decode_batch_sizes.split(",")
            for c in a.decode_context_lens.split(",")
        ]
        for extra in filter(None, a.decode_extra.split(",")):
            b, c = extra.split("x")
            shapes.append((int(b), int(c)))
        return shapes

    def prefill_shapes(self) -> list[tuple[int, int, int]]:
        shapes = []
        for case in self.args.prefill_cases.split(","):
            reqs, rest = case.split("x")
            new, prefix = rest.split("+")
            shapes.append((int(reqs), int(new), int(prefix)))
        return shapes

    # ------------------------------------------------------------ run

    def run(self) -> list[Row]:
        from common.attention import reference

        self.measure_ceilings()
        rows: list[Row] = []
        if self.args.skip_table and self.args.tune:
            self.tune()
            return rows
        for cache_name, cache_dtype in self.cache_dtypes():
            cases = [("write_kv", t) for t in ((256, 2048) if not self.args.smoke else (5,))]
            cases += [("decode", shape) for shape in self.decode_shapes()]
            cases += [("prefill", shape) for shape in self.prefill_shapes()]
            for kind, shape in cases:
                try:
                    if kind == "write_kv":
                        new_rows = [self.bench_write_kv(shape, cache_name, cache_dtype, reference)]
                    elif kind == "decode":
                        new_rows = self.bench_decode(*shape, cache_name, cache_dtype)
                    else:
                        new_rows = [self.bench_prefill(*shape, cache_name, cache_dtype)]
                except Exception as exc:  # report the case as failed and go on with the others
                    traceback.print_exc()
                    new_rows = [
                        Row(
                            kind,
                            str(shape),
                            cache_name,
                            float("nan"),
                            float("nan"),
                            "",
                            float("nan"),
                            "",
                            None,
                            float("inf"),
                            [f"{type(exc).__name__}: {str(exc)[:100]}"],
                        )
                    ]
                for row in new_rows:
                    rows.append(row)
                    print(_format_row(row), flush=True)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
        if self.args.tune:
            self.tune()
        return rows

    def bench_write_kv(self, tokens, cache_name, cache_dtype, reference) -> Row:
        from common.attention.triton_write_kv import write_kv

        batch = self.batch([tokens], [tokens], cache_dtype)
        args = (batch.key, batch.value)
        expected = batch.kv_cache.clone()
        reference.write_kv(*args, expected, 0, batch.metadata.slot_mapping, batch.k_scale, batch.v_scale)
        write_kv(*args, batch.kv_cache, 0, batch.metadata.slot_mapping, batch.k_scale, batch.v_scale)
        slots = batch.metadata.slot_mapping
        blocks, offsets = slots // self.args.block_size, slots % self.args.block_size
        got_rows, want_rows = batch.kv_cache[blocks, 0, :, :, offsets], expected[blocks, 0, :, :, offsets]
        differ = int((got_rows.view(torch.uint8) != want_rows.view(torch.uint8)).sum())
        err = relative_error(got_rows.float(), want_rows.float())
        note = "bit-exact" if differ == 0 else f"{differ} of {got_rows.numel()} stored values differ"
        ms = self.time_ms(
            lambda: write_kv(
                *args, batch.kv_cache, 0, batch.metadata.slot_mapping, batch.k_scale, batch.v_scale
            )
        )
        ref_ms = self.time_ms(  # the reference reads the slot mask back to the host: no graph
            lambda: reference.write_kv(
                *args, expected, 0, batch.metadata.slot_mapping, batch.k_scale, batch.v_scale
            ),
            graph=False,
        )
        elems = 2 * tokens * self.args.num_kv_heads * self.args.head_dim
        moved = elems * (batch.key.element_size() + batch.kv_cache.element_size())
        tbps = moved / (ms * 1e-3) / 1e12
        return Row(
            "write_kv",
            f"T={tokens}",
            cache_name,
            ms * 1e3,
            tbps,
            "TB/s",
            tbps / self.ceilings["copy_TBps"],
            "torch ref",
            ref_ms * 1e3,
            err,
            [note],
        )

    def bench_decode(self, batch_size, context, cache_name, cache_dtype) -> list[Row]:
        from common.attention.triton_decode import choose_num_splits, decode_attention
        from common.attention.triton_paged_tiles import num_sms
        from common.attention.triton_prefill import prefill_attention

        b = self.batch([1] * batch_size, [context] * batch_size, cache_dtype)
        splits = choose_num_splits(batch_size, context, self.args.num_kv_heads, num_sms(self.device))
        out = torch.full_like(b.query, float("nan"))

        def decode():
            decode_attention(b.query, b.kv_cache, 0, b.metadata, b.scale, b.k_scale, b.v_scale, out=out)

        decode()
        err = reference_error(b, out, max_requests=4)
        ms = self.time_ms(decode)
        a = self.args
        kv_bytes = batch_size * context * a.num_kv_heads * a.head_dim * 2 * b.kv_cache.element_size()
        moved = kv_bytes + 2 * b.query.numel() * b.query.element_size()
        sdpa_ms, sdpa_note = self.sdpa_decode(b, out)
        tbps = moved / (ms * 1e-3) / 1e12
        shape = f"B={batch_size} ctx={context}"
        rows = [
            Row(
                "decode",
                shape,
                cache_name,
                ms * 1e3,
                tbps,
                "TB/s",
                tbps / self.ceilings["copy_TBps"],
                self.baseline,
                sdpa_ms * 1e3 if sdpa_ms else None,
                err,
                [f"splits={splits}", *sdpa_note],
            )
        ]
        if not self.args.no_unified:
            out2 = torch.full_like(b.query, float("nan"))

            def unified():
                prefill_attention(b.query, b.kv_cache, 0, b.metadata, b.scale, b.k_scale, b.v_scale, out=out2)

            unified()
            err2 = reference_error(b, out2, max_requests=4)
            ms2 = self.time_ms(unified)
            tbps2 = moved / (ms2 * 1e-3) / 1e12
            rows.append(
                Row(
                    "decode/unified",
                    shape,
                    cache_name,
                    ms2 * 1e3,
                    tbps2,
                    "TB/s",
                    tbps2 / self.ceilings["copy_TBps"],
                    self.baseline,
                    sdpa_ms * 1e3 if sdpa_ms else None,
                    err2,
                    ["prefill kernel on decode"],
                )
            )
        return rows

    def bench_prefill(self, reqs, new, prefix, cache_name, cache_dtype) -> Row:
        from common.attention.triton_prefill import prefill_attention

        b = self.batch([new] * reqs, [new + prefix] * reqs, cache_dtype)
        out = torch.full_like(b.query, float("nan"))

        def prefill():
            prefill_attention(b.query, b.kv_cache, 0, b.metadata, b.scale, b.k_scale, b.v_scale, out=out)

        prefill()
        err = reference_error(b, out, max_requests=2)
        ms = self.time_ms(prefill)
        a = self.args
        visible = reqs * (new * prefix + new * (new + 1) // 2)  # (query, key) pairs attended
        flops = 4 * a.head_dim * a.num_q_heads * visible
        tflops = flops / (ms * 1e-3) / 1e12
        sdpa_ms, sdpa_note = self.sdpa_prefill(b, reqs, new, prefix, out)
        return Row(
            "prefill",
            f"{reqs}x{new} new + {prefix} cached",
            cache_name,
            ms * 1e3,
            tflops,
            "TFLOP/s",
            tflops / self.ceilings["matmul_TFLOPs"],
            self.baseline,
            sdpa_ms * 1e3 if sdpa_ms else None,
            err,
            sdpa_note,
        )

    # ------------------------------------------------------------ baselines

    def contiguous_kv(self, b: PagedBatch, num_reqs: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each request's K and V as contiguous [reqs, Hkv, seq_len, D] in the query dtype."""
        from common.attention.reference import gather_context

        out = []
        for kv, scale in ((0, b.k_scale), (1, b.v_scale)):
            t = torch.empty(
                (num_reqs, self.args.num_kv_heads, seq_len, self.args.head_dim),
                dtype=self.dtype,
                device=self.device,
            )
            for i in range(num_reqs):
                t[i] = (
                    gather_context(b.kv_cache, 0, b.metadata.block_tables[i], seq_len, kv).float() * scale
                ).to(self.dtype)
            out.append(t)
        return out[0], out[1]

    def flash(self, q, k, v, causal: bool) -> torch.Tensor:
        """torch's flash-attention kernel ([B, H, L, D] views); causal is bottom-right aligned."""
        if self.device.type == "cuda":
            return torch.ops.aten._scaled_dot_product_flash_attention(
                q, k, v, 0.0, causal, False, scale=self.args.head_dim**-0.5
            )[0]
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(q.shape[2], k.shape[2]) if causal else None
        if k.shape[1] != q.shape[1]:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.args.head_dim**-0.5)

    def sdpa_decode(self, b: PagedBatch, ours: torch.Tensor) -> tuple[float | None, list[str]]:
        """Decode as flash sees it: per (sequence, KV head), the G query heads are G query rows."""
        batch_size, context = len(b.metadata.seq_lens_cpu), b.metadata.max_seq_len
        a = self.args
        k, v = self.contiguous_kv(b, batch_size, context)
        group = a.num_q_heads // a.num_kv_heads
        q = b.query.view(batch_size, a.num_kv_heads, group, a.head_dim)
        try:
            got = self.flash(q, k, v, causal=False).reshape(batch_size, a.num_q_heads, a.head_dim)
        except RuntimeError as exc:
            return None, [f"sdpa flash unavailable: {str(exc).splitlines()[0][:80]}"]
        notes = []
        err = relative_error(got, ours.float())
        if err > 2 * TOLERANCE:
            notes.append(f"sdpa differs from ours by {err:.1e}")
        if b.kv_cache.dtype != self.dtype:
            notes.append("sdpa reads a bf16 copy")
        ms = self.time_ms(lambda: self.flash(q, k, v, causal=False))
        return ms, notes

    def sdpa_prefill(self, b: PagedBatch, reqs: int, new: int, prefix: int, ours: torch.Tensor):
        a = self.args
        k, v = self.contiguous_kv(b, reqs, new + prefix)
        q = b.query.view(reqs, new, a.num_q_heads, a.head_dim).transpose(1, 2)
        notes = []
        try:
            got = self.flash(q, k, v, causal=True)
        except RuntimeError:  # no native GQA: give flash the KV heads repeated
            k = k.repeat_interleave(a.num_q_heads // a.num_kv_heads, 1)
            v = v.repeat_interleave(a.num_q_heads // a.num_kv_heads, 1)
            notes.append("sdpa on repeated KV heads")
            got = self.flash(q, k, v, causal=True)
        err = relative_error(got.transpose(1, 2).reshape_as(ours), ours.float())
        if err > 2 * TOLERANCE:
            notes.append(f"sdpa differs from ours by {err:.1e}")
        ms = self.time_ms(lambda: self.flash(q, k, v, causal=True))
        return ms, notes

    # ------------------------------------------------------------ tuning sweep

    def tune(self) -> None:
        """Print sweeps of kernel configs and split counts (the data behind the defaults)."""
        sections = set(self.args.tune_sections.split(","))
        if "decode" in sections:
            self.tune_decode_configs(None)
        if "decode-fp8" in sections:
            self.tune_decode_configs(torch.float8_e4m3fn)
        if "splits" in sections:
            self.tune_splits()
        for name, cache_dtype in (("prefill", None), ("prefill-fp8", torch.float8_e4m3fn)):
            if name in sections:
                self.tune_prefill(cache_dtype)

    def tune_decode_configs(self, cache_dtype) -> None:
        from common.attention.triton_decode import DecodeConfig, decode_attention

        print(
            f"\n## tune: decode configs ({cache_dtype or self.dtype} cache), block_n/warps/stages: µs",
            flush=True,
        )
        configs = [
            DecodeConfig(bn, w, s)
            for bn, w, s in [
                (64, 4, 3),
                (32, 4, 4),
                (128, 4, 3),
                (128, 4, 4),
                (256, 4, 3),
                (64, 8, 3),
                (128, 8, 3),
                (256, 8, 3),
                (64, 4, 5),
                (64, 2, 3),
            ]
        ]
        shapes = [(64, 4096), (256, 8192), (8, 2048), (1, 8192)]
        if self.args.smoke:
            configs, shapes = configs[:2], [(2, 40)]
        for batch_size, context in shapes:
            b = self.batch([1] * batch_size, [context] * batch_size, cache_dtype)
            line = []
            for cfg in configs:
                ms = self.time_ms(
                    lambda b=b, cfg=cfg: decode_attention(
                        b.query, b.kv_cache, 0, b.metadata, b.scale, b.k_scale, b.v_scale, config=cfg
                    )
                )
                line.append(f"{cfg.block_n}/{cfg.num_warps}/{cfg.num_stages}:{ms * 1e3:.1f}")
            print(f"B={batch_size} ctx={context}: " + "  ".join(line), flush=True)

    def tune_splits(self) -> None:
        from common.attention.triton_decode import decode_attention

        print("\n## tune: decode split counts (bf16 cache), splits: µs", flush=True)
        shapes = [(1, 512), (1, 2048), (1, 8192), (8, 512), (8, 2048), (8, 8192), (64, 512), (64, 4096)]
        for batch_size, context in [(1, 200)] if self.args.smoke else shapes:
            b = self.batch([1] * batch_size, [context] * batch_size, None)
            line = []
            for splits in (1, 2, 4, 8, 16, 32, 64):
                if splits * (16 if self.args.smoke else 64) > context:
                    break
                ms = self.time_ms(
                    lambda b=b, s=splits: decode_attention(
                        b.query, b.kv_cache, 0, b.metadata, b.scale, num_splits=s
                    )
                )
                line.append(f"{splits}:{ms * 1e3:.1f}")
            print(f"B={batch_size} ctx={context}: " + "  ".join(line), flush=True)

    def tune_prefill(self, cache_dtype) -> None:
        from common.attention.triton_prefill import PrefillConfig, prefill_attention

        a = self.args
        print(
            f"\n## tune: prefill configs ({cache_dtype or self.dtype} cache), m/n/warps/stages: TFLOP/s",
            flush=True,
        )
        configs = [
            PrefillConfig(m, n, w, s)
            for m, n, w, s in [
                (128, 64, 8, 3),
                (128, 128, 8, 3),
                (128, 32, 4, 3),
                (128, 32, 4, 4),
                (128, 64, 4, 3),
                (128, 64, 4, 4),
                (64, 64, 4, 3),
                (64, 32, 4, 3),
                (128, 32, 8, 3),
                (128, 128, 8, 2),
                (256, 64, 8, 3),
                (256, 32, 8, 3),
            ]
        ]
        shapes = [(8, 2048, 0), (1, 2048, 6144), (1, 512, 3584)]
        if self.args.smoke:
            configs, shapes = [PrefillConfig(16, 16, 4, 1), PrefillConfig(32, 16, 4, 1)], [(1, 20, 7)]
        for reqs, new, prefix in shapes:
            b = self.batch([new] * reqs, [new + prefix] * reqs, cache_dtype)
            flops = 4 * a.head_dim * a.num_q_heads * reqs * (new * prefix + new * (new + 1) // 2)
            line = []
            for cfg in configs:
                label = f"{cfg.block_m}/{cfg.block_n}/{cfg.num_warps}/{cfg.num_stages}"
                try:
                    ms = self.time_ms(
                        lambda b=b, cfg=cfg: prefill_attention(
                            b.query, b.kv_cache, 0, b.metadata, b.scale, b.k_scale, b.v_scale, config=cfg
                        )
                    )
                    line.append(f"{label}:{flops / ms / 1e9:.0f}")
                except Exception as exc:  # a config that does not fit (shared memory) is reported, not fatal
                    line.append(f"{label}:{type(exc).__name__}")
            print(f"{reqs}x{new}+{prefix}: " + "  ".join(line), flush=True)


def _format_row(r: Row) -> str:
    base = f"{r.baseline_us:9.1f}" if r.baseline_us is not None else "        -"
    speed = f"{r.speedup:5.2f}x" if r.speedup is not None else "    - "
    return (
        f"| {r.kernel:<14} | {r.shape:<26} | {r.cache:<8} | {r.time_us:9.1f} | {r.achieved:7.2f} {r.unit:<7} "
        f"| {100 * r.fraction:5.1f}% | {r.baseline:<10} {base} | {speed} | {r.error:.1e} | {'; '.join(r.notes)} |"
    )


def format_table(rows: list[Row], ceilings: dict[str, float], device_name: str) -> str:
    head = (
        f"device: {device_name}; ceilings measured in this run: copy {ceilings['copy_TBps']:.2f} TB/s, "
        f"bf16 matmul {ceilings['matmul_TFLOPs']:.0f} TFLOP/s\n\n"
        "| kernel         | shape                      | cache    |   time µs | achieved        "
        "| of ceil | baseline µs          | speedup | rel err | notes |\n"
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|"
    )
    return "\n".join([head, *(_format_row(r) for r in rows)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pdserve bench kernels", description=__doc__.splitlines()[0])
    add_kernel_bench_args(parser)
    return run_kernel_bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
