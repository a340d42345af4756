"""`pdserve bench NAME`: the one way to run each benchmark (results belong in docs/benchmarks.md).

Every benchmark's flags live in a module that imports no torch; torch and the engine load
inside the run, so `pdserve bench -h`, `pdserve bench serve` and `pdserve bench route`
start without them.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pdserve.bench.cpu_throughput import add_cpu_throughput_args, run_cpu_throughput
from pdserve.bench.decode_step.command import add_decode_step_args, run_decode_step_bench
from pdserve.bench.disagg_latency import add_disagg_latency_args, run_disagg_latency
from pdserve.bench.grammar import add_grammar_args, run_grammar_bench
from pdserve.bench.kernels.command import add_kernel_bench_args, run_kernel_bench
from pdserve.bench.lora_kernels import add_lora_kernels_args, run_lora_kernels
from pdserve.bench.make_bench_model import add_make_model_args, run_make_model
from pdserve.bench.moe_kernel import add_moe_kernel_args, run_moe_kernel_bench
from pdserve.bench.prefill.command import add_prefill_args, run_prefill_bench
from pdserve.bench.prefix_index import add_prefix_index_args, run_prefix_index_bench
from pdserve.bench.roofline import add_roofline_args, run_roofline
from pdserve.bench.route_sim.command import add_route_args, run_route_bench
from pdserve.bench.router_overhead import add_router_overhead_args, run_router_overhead
from pdserve.bench.serve.cli_args import add_bench_serve_args
from pdserve.bench.serve.command import run_bench_serve
from pdserve.bench.tp_check import add_tp_check_args, run_tp_check
from pdserve.bench.transfer.command import add_transfer_args, run_transfer_bench
from pdserve.bench.warm_start import add_warm_start_args, run_warm_start


@dataclass(frozen=True)
class Benchmark:
    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


BENCHMARKS: dict[str, Benchmark] = {
    "serve": Benchmark(
        "Load a running OpenAI-compatible server and report TTFT, TPOT, ITL, throughput (as vllm bench serve).",
        add_bench_serve_args,
        run_bench_serve,
    ),
    "kernels": Benchmark(
        "Check each attention kernel against its reference and time it (GPU).",
        add_kernel_bench_args,
        run_kernel_bench,
    ),
    "lora-kernels": Benchmark(
        "Batched multi-adapter LoRA kernels (Triton) against the torch reference, a per-request loop "
        "and the base layers, at Llama-3-8B shapes (GPU).",
        add_lora_kernels_args,
        run_lora_kernels,
    ),
    "moe-kernel": Benchmark(
        "The fused mixture-of-experts kernels (Triton; bf16 and fp8 experts) at Qwen3-30B-A3B and "
        "Mixtral-8x7B shapes against a per-expert torch matmul loop and the bytes/FLOPs floor (GPU).",
        add_moe_kernel_args,
        run_moe_kernel_bench,
    ),
    "decode-step": Benchmark(
        "Time a whole-model decode step against the weight-read floor (GPU).",
        add_decode_step_args,
        run_decode_step_bench,
    ),
    "prefill": Benchmark(
        "Time to first token of prompts on the engine (chunked as served) against their compute "
        "floor at the measured matmul rate: ratio, TFLOP/s, MFU; --profile groups the kernels.",
        add_prefill_args,
        run_prefill_bench,
    ),
    "roofline": Benchmark(
        "The roofline of a serving workload (random prompts, N requests at concurrency C): prefill "
        "FLOPs at the measured matmul rate plus every decode step's bytes at the measured copy "
        "bandwidth, as output tokens/s, and a measured throughput's fraction of it.",
        add_roofline_args,
        run_roofline,
    ),
    "transfer": Benchmark(
        "KV-transfer throughput between two processes through each connector; on a GPU, every "
        "data path against a device copy (--gpu-table).",
        add_transfer_args,
        run_transfer_bench,
    ),
    "route": Benchmark(
        "Replay a request trace (Mooncake format) through the router's routing policies against "
        "simulated workers: cache hit rate against the oracle, load balance, simulated TTFT.",
        add_route_args,
        run_route_bench,
    ),
    "prefix-index": Benchmark(
        "The router's own cost on a trace: routing decisions and KV events indexed per second.",
        add_prefix_index_args,
        run_prefix_index_bench,
    ),
    "router-overhead": Benchmark(
        "What the router adds per request on 4k-token prompts through HTTP (p50/p99, against the "
        "same request sent straight to a worker) and its routing decisions per second.",
        add_router_overhead_args,
        run_router_overhead,
    ),
    "grammar": Benchmark(
        "Grammar engines for structured outputs (llguidance, xgrammar): mask time per token, "
        "batch-64 mask, compile time, schema support.",
        add_grammar_args,
        run_grammar_bench,
    ),
    "cpu-throughput": Benchmark(
        "CPU output tokens/s: pdserve run-batch against transformers' generate on the same requests.",
        add_cpu_throughput_args,
        run_cpu_throughput,
    ),
    "disagg-latency": Benchmark(
        "TTFT and TPOT through pdserve serve, remote prefill against prefill on the decode worker.",
        add_disagg_latency_args,
        run_disagg_latency,
    ),
    "warm-start": Benchmark(
        "Time pdserve serve to ready with an empty and with a filled kernel cache, and each start's "
        "first request's TTFT against the requests after it.",
        add_warm_start_args,
        run_warm_start,
    ),
    "tp-check": Benchmark(
        "Tensor parallelism on this machine: TP=N greedy tokens against one process, and generate time.",
        add_tp_check_args,
        run_tp_check,
    ),
    "make-model": Benchmark(
        "Write a model folder with a bundled config's shapes and the embedded tokenizer, for "
        "pdserve serve --load-format dummy and pdserve bench serve --tokenizer DIR.",
        add_make_model_args,
        run_make_model,
    ),
}


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench", help="Run a pdserve benchmark.", description="Run a pdserve benchmark."
    )
    benches = parser.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    for name, bench in BENCHMARKS.items():
        sub = benches.add_parser(name, help=bench.help, description=bench.help)
        bench.add_args(sub)
        sub.set_defaults(func=bench.run)
