"""The cases of `pdserve bench kernels`: paged batches of each shape, every kernel checked
against its torch reference and timed (CUDA-graph replays through do_bench), with the
copy and matmul ceilings of the run."""

from __future__ import annotations

import argparse
import functools
import traceback

import torch

from common.attention.paged_batch import PagedBatch, make_paged_batch, reference_error, relative_error
from pdserve.bench.kernels.report import Row, format_row
from pdserve.bench.kernels.sdpa_baseline import SdpaBaseline
from pdserve.bench.kernels.tuning import KernelTuning
from pdserve.bench.timing import capture_graph, copy_bandwidth, time_ms

CACHE_DTYPES = {"auto": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp8": torch.float8_e4m3fn}


class KernelBench(SdpaBaseline, KernelTuning):
    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args = args
        self.device = device
        self.dtype = getattr(torch, args.dtype)
        self.ceilings: dict[str, float] = {}
        self.baseline = "sdpa flash" if device.type == "cuda" else "sdpa (cpu)"

    def time_ms(self, fn, graph: bool = True) -> float:
        """Median milliseconds of fn; on CUDA, of a CUDA-graph replay of it when graph is set.

        Replaying a graph keeps the host's launch cost (tens of µs for a Triton launch from
        Python) out of the figure, as in a served decode step; do_bench flushes L2 before
        each replay, so small problems are not timed from the cache.
        """
        if self.device.type == "cuda" and graph:
            fn = capture_graph(fn).replay
        return time_ms(
            fn, self.device, warmup_ms=self.args.warmup_ms, rep_ms=self.args.rep_ms, host_repeats=3
        )

    def measure_ceilings(self) -> None:
        timer = functools.partial(self.time_ms, graph=False)
        self.ceilings["copy_TBps"] = copy_bandwidth(self.device, timer, cpu_bytes=1 << 24) / 1e12
        m = 8192 if self.device.type == "cuda" else 256
        a = torch.randn(m, m, device=self.device, dtype=torch.bfloat16)
        b = torch.randn(m, m, device=self.device, dtype=torch.bfloat16)
        ms = timer(lambda: a @ b)
        self.ceilings["matmul_TFLOPs"] = 2 * m**3 / (ms * 1e-3) / 1e12
        print(
            f"ceilings: copy {self.ceilings['copy_TBps']:.2f} TB/s (read + write), "
            f"bf16 matmul {self.ceilings['matmul_TFLOPs']:.0f} TFLOP/s",
            flush=True,
        )

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
                    new_rows = [Row.failed(kind, str(shape), cache_name, exc)]
                for row in new_rows:
                    rows.append(row)
                    print(format_row(row), flush=True)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
        if self.args.tune:
            self.tune()
        return rows

    def check_and_time(self, b: PagedBatch, attend, max_requests: int) -> tuple[torch.Tensor, float, float]:
        """Run attention kernel `attend` on batch `b` once, check its output against the torch
        reference on the first `max_requests` requests, then time it: (output, error, ms)."""
        out = torch.full_like(b.query, float("nan"))

        def run():
            attend(b.query, b.kv_cache, 0, b.metadata, b.scale, b.k_scale, b.v_scale, out=out)

        run()
        err = reference_error(b, out, max_requests=max_requests)
        return out, err, self.time_ms(run)

    def bandwidth_row(self, kernel, shape, cache_name, ms, moved, baseline, baseline_us, err, notes) -> Row:
        """A row for a kernel that moves `moved` bytes in `ms`: TB/s against the copy ceiling."""
        tbps = moved / (ms * 1e-3) / 1e12
        ceiling = self.ceilings["copy_TBps"]
        return Row(
            kernel,
            shape,
            cache_name,
            ms * 1e3,
            tbps,
            "TB/s",
            tbps / ceiling,
            baseline,
            baseline_us,
            err,
            notes,
        )

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
        return self.bandwidth_row(
            "write_kv", f"T={tokens}", cache_name, ms, moved, "torch ref", ref_ms * 1e3, err, [note]
        )

    def bench_decode(self, batch_size, context, cache_name, cache_dtype) -> list[Row]:
        from common.attention.triton_decode import choose_num_splits, decode_attention
        from common.attention.triton_paged_tiles import num_sms
        from common.attention.triton_prefill import prefill_attention

        b = self.batch([1] * batch_size, [context] * batch_size, cache_dtype)
        splits = choose_num_splits(batch_size, context, self.args.num_kv_heads, num_sms(self.device))
        out, err, ms = self.check_and_time(b, decode_attention, max_requests=4)
        a = self.args
        kv_bytes = batch_size * context * a.num_kv_heads * a.head_dim * 2 * b.kv_cache.element_size()
        moved = kv_bytes + 2 * b.query.numel() * b.query.element_size()
        sdpa_ms, sdpa_note = self.sdpa_decode(b, out)
        shape = f"B={batch_size} ctx={context}"
        sdpa_us = sdpa_ms * 1e3 if sdpa_ms else None
        notes = [f"splits={splits}", *sdpa_note]
        rows = [
            self.bandwidth_row("decode", shape, cache_name, ms, moved, self.baseline, sdpa_us, err, notes)
        ]
        if not self.args.no_unified:
            _, err2, ms2 = self.check_and_time(b, prefill_attention, max_requests=4)
            notes = ["prefill kernel on decode"]
            rows.append(
                self.bandwidth_row(
                    "decode/unified", shape, cache_name, ms2, moved, self.baseline, sdpa_us, err2, notes
                )
            )
        return rows

    def bench_prefill(self, reqs, new, prefix, cache_name, cache_dtype) -> Row:
        from common.attention.triton_prefill import prefill_attention

        b = self.batch([new] * reqs, [new + prefix] * reqs, cache_dtype)
        out, err, ms = self.check_and_time(b, prefill_attention, max_requests=2)
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
