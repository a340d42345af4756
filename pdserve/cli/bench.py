"""`pdserve bench`: the benchmarks that measure pdserve (results belong in docs/benchmarks.md)."""

from __future__ import annotations

import importlib
from typing import Any

# The router's trace replay; named by string so that common never imports router itself.
ROUTE_BENCH_MODULE = "pdserve.bench.route_sim.bench_command"


def register(subparsers: Any) -> None:
    from pdserve.bench.decode_step import add_decode_step_args, run_decode_step_bench
    from pdserve.bench.kernels import add_kernel_bench_args, run_kernel_bench
    from pdserve.bench.serve.cli_args import add_bench_serve_args
    from pdserve.bench.serve.command import run_bench_serve

    parser = subparsers.add_parser("bench", help="Run a pdserve benchmark.")
    benches = parser.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    serve = benches.add_parser(
        "serve",
        help="Load a running OpenAI-compatible server and report TTFT, TPOT, ITL, throughput (as vllm bench serve).",
    )
    add_bench_serve_args(serve)
    serve.set_defaults(func=run_bench_serve)
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
    route = benches.add_parser(
        "route",
        help="Replay a request trace (Mooncake format) through the router's routing policies against "
        "simulated workers: cache hit rate against the oracle, load balance, simulated TTFT.",
    )
    route_bench = importlib.import_module(ROUTE_BENCH_MODULE)
    route_bench.add_route_args(route)
    route.set_defaults(func=route_bench.run_route_bench)
