"""`pdserve bench`: the benchmarks that measure pdserve (results belong in docs/benchmarks.md)."""

from __future__ import annotations

from typing import Any


def register(subparsers: Any) -> None:
    from common.bench.decode_step import add_decode_step_args, run_decode_step_bench
    from common.bench.kernels import add_kernel_bench_args, run_kernel_bench

    parser = subparsers.add_parser("bench", help="Run a pdserve benchmark.")
    benches = parser.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    kernels = benches.add_parser(
        "kernels", help="Check each attention kernel against its reference and time it (GPU)."
    )
    add_kernel_bench_args(kernels)
    kernels.set_defaults(func=run_kernel_bench)
    decode = benches.add_parser(
        "decode-step", help="Time a whole-model decode step against the weight-read floor (GPU)."
    )
    add_decode_step_args(decode)
    decode.set_defaults(func=run_decode_step_bench)
