"""`pdserve bench kernels`: its flags and its entry. Torch loads only when it runs, so
`pdserve bench` can list and parse every benchmark without it."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

DEFAULT_PREFILL_CASES = "1x512+0,1x512+3584,1x2048+0,1x2048+2048,1x2048+6144,8x2048+0,4x512+2048"
SMOKE_PREFILL_CASES = "2x20+0,1x33+40"


def add_kernel_bench_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtype", default="bfloat16", choices=["bfloat16", "float16"], help="query/output dtype"
    )
    parser.add_argument(
        "--kv-cache-dtypes",
        default="auto,fp8",
        help="comma list of cache dtypes to run: auto (= --dtype), fp8",
    )
    parser.add_argument(
        "--decode-batch-sizes", default="1,8,64,256", help="Decode batch sizes to time, comma-separated."
    )
    parser.add_argument(
        "--decode-context-lens",
        default="512,2048,8192",
        help="Decode context lengths (tokens per sequence) to time, comma-separated.",
    )
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
    parser.add_argument("--num-q-heads", type=int, default=32, help="Query heads of the attention shape.")
    parser.add_argument("--num-kv-heads", type=int, default=8, help="KV heads of the attention shape.")
    parser.add_argument("--head-dim", type=int, default=128, help="Head dimension of the attention shape.")
    parser.add_argument("--block-size", type=int, default=16, help="Tokens per KV-cache block.")
    parser.add_argument(
        "--warmup-ms", type=float, default=25.0, help="Warm-up time per figure (triton.testing.do_bench)."
    )
    parser.add_argument(
        "--rep-ms", type=float, default=100.0, help="Repetition time per figure (triton.testing.do_bench)."
    )
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
    import torch

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
    from pdserve.bench.kernels.kernel_bench import KernelBench
    from pdserve.bench.kernels.report import TOLERANCE, kernel_table

    bench = KernelBench(args, device)
    rows = bench.run()
    print()
    print(
        kernel_table(
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
