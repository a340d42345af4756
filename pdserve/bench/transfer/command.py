"""`pdserve bench transfer`: its flags and its entry. Torch loads only when it runs, so
`pdserve bench` can list and parse every benchmark without it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_transfer_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--connectors",
        nargs="+",
        default=["TcpConnector", "NixlConnector"],
        help="connectors to measure (default: TcpConnector NixlConnector)",
    )
    parser.add_argument("--mib", type=float, default=256, help="MiB per pull (default 256)")
    parser.add_argument("--pulls", type=int, default=5, help="timed pulls per connector (default 5)")
    parser.add_argument("--device", default="cpu", help="where both KV caches live: cpu or cuda")
    parser.add_argument("--num-layers", type=int, default=30, help="layers of the bench model (default 30)")
    parser.add_argument("--num-kv-heads", type=int, default=3, help="KV heads of the bench model (default 3)")
    parser.add_argument("--head-size", type=int, default=64, help="head size of the bench model (default 64)")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per block (default 16)")
    parser.add_argument(
        "--gpu-table",
        action="store_true",
        help="compare the GPU data paths at Llama-3-8B shapes against a device copy",
    )
    parser.add_argument(
        "--tokens",
        type=int,
        nargs="+",
        default=[2048, 8192, 32768],
        help="request sizes in tokens for --gpu-table (default 2048 8192 32768)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("bench-transfer-logs"),
        help="folder for the logs of --gpu-table's rows (default bench-transfer-logs)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        help='with --gpu-table: only rows whose label contains one of these ("LABEL$": exactly that label)',
    )
    parser.add_argument(
        "--kernel-sweep",
        action="store_true",
        help="time the block-copy kernel alone for several tilings at --tokens (CUDA events)",
    )
    parser.add_argument("--one-row", help=argparse.SUPPRESS)  # a row of --gpu-table, run by it


def run_transfer_bench(args: argparse.Namespace) -> int:
    """Run the mode the flags ask for and print its figures; 0 when it ran."""
    if args.one_row:
        from pdserve.bench.transfer.gpu_table import GpuRow, run_row

        run_row(GpuRow(**json.loads(args.one_row)), args.tokens)
        return 0
    if args.kernel_sweep:
        from pdserve.bench.transfer.device_copy import kernel_sweep

        kernel_sweep(args.tokens)
        return 0
    if args.gpu_table:
        from pdserve.bench.transfer.gpu_table import gpu_table

        gpu_table(args.tokens, args.out, args.only)
        return 0
    from kvtransfer.kv_cache_spec import KVCacheSpec
    from pdserve.bench.transfer.connector_pull import bench_transfer

    spec = KVCacheSpec(
        "bench", "bfloat16", args.num_kv_heads, args.head_size, args.num_layers, args.block_size
    )
    for connector in args.connectors:
        result = bench_transfer(connector, mib=args.mib, spec=spec, pulls=args.pulls, device=args.device)
        print(result.summary(), flush=True)
    return 0
