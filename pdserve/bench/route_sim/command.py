"""`pdserve bench route`: routing quality of each policy on a request trace.

    pdserve bench route --trace mooncake_synthetic_trace.jsonl --num-workers 8 --policy all

Prints the JSON report on stdout (and to --output-json), a table on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from typing import Any

from common.config.arg_types import human_int, int_at_least, number_above
from pdserve.bench.route_sim.service_model import ServiceModel
from pdserve.bench.route_sim.trace_replay import default_blocks_per_worker, oracle_hit_rate, replay
from pdserve.bench.table import aligned_columns
from pdserve.bench.trace import load_trace
from router.cli import add_routing_weights_arg
from router.policy.named import POLICY_NAMES

_TABLE = [
    ("policy", "policy", "{}"),
    ("hit_rate", "hit", "{:.4f}"),
    ("hit_vs_oracle", "hit/oracle", "{:.4f}"),
    ("load_imbalance", "imbalance", "{:.3f}"),
    ("ttft_p50_ms", "TTFT p50 ms", "{:.0f}"),
    ("ttft_p99_ms", "TTFT p99 ms", "{:.0f}"),
    ("decisions_per_s", "decisions/s", "{:.0f}"),
    ("kv_events_per_s", "KV events/s", "{:.0f}"),
    ("wall_s", "wall s", "{:.1f}"),
]


_positive_float = number_above(0)
_non_negative_float = number_above(0, inclusive=True)


def add_route_args(parser: argparse.ArgumentParser) -> None:
    model = ServiceModel()
    parser.add_argument(
        "--trace",
        required=True,
        help="Mooncake-format JSONL trace: one request a line with timestamp (ms), input_length, "
        "output_length and hash_ids (ids of 512-token prompt blocks; equal ids = equal prefix blocks).",
    )
    parser.add_argument(
        "--num-workers", type=int_at_least(1), default=8, help="Simulated workers to route over."
    )
    parser.add_argument(
        "--policy",
        choices=[*POLICY_NAMES, "all"],
        default="all",
        help="Routing policy to replay: round_robin, least_loaded (fewest queued prefill tokens), "
        "longest_prefix (most cached blocks, ties to the least loaded, no load term), prefix (the "
        "router's own policy with --routing-weights), or all of them.",
    )
    parser.add_argument(
        "--blocks-per-worker",
        type=human_int(minimum=1),
        default=None,
        help="KV-cache capacity of each worker in 512-token blocks, evicted LRU. (default: a tenth "
        "of the trace's distinct blocks, at least its longest prompt)",
    )
    parser.add_argument(
        "--output-json", default=None, metavar="FILE", help="Also write the JSON report to FILE."
    )
    parser.add_argument(
        "--max-requests",
        type=int_at_least(1),
        default=None,
        help="Replay only the first N requests of the trace. (default: all)",
    )
    parser.add_argument(
        "--time-scale",
        type=_positive_float,
        default=1.0,
        help="Multiply the trace's arrival times by this: below 1 the same requests come faster "
        "(more load), above 1 slower.",
    )
    add_routing_weights_arg(parser)  # the router's own flag: replays its policy with the same weights
    sim = parser.add_argument_group("service-time model of a worker")
    sim.add_argument(
        "--token-rate",
        type=_positive_float,
        default=model.token_rate,
        help="Tokens per second a worker computes through its dense layers (prefill chunks and "
        "decode tokens alike).",
    )
    sim.add_argument(
        "--step-overhead-ms",
        type=_non_negative_float,
        default=model.step_overhead_s * 1000,
        help="Fixed cost of every engine step (reading the weights), in ms.",
    )
    sim.add_argument(
        "--attention-crossover-tokens",
        type=_non_negative_float,
        default=model.attention_crossover_tokens,
        help="Context length at which a prompt token's attention costs as much as its dense "
        "layers (attention grows with the context). 0 makes attention free.",
    )
    sim.add_argument(
        "--kv-read-ms-per-ktoken",
        type=_non_negative_float,
        default=model.kv_read_s_per_ktoken * 1000,
        help="Time a decoding sequence spends per step reading 1,000 tokens of its KV cache, in ms.",
    )
    sim.add_argument(
        "--max-num-batched-tokens",
        type=int_at_least(1),
        default=model.max_num_batched_tokens,
        help="Token budget of one engine step (chunked prefill), as the engine's flag.",
    )
    sim.add_argument(
        "--max-num-seqs",
        type=int_at_least(1),
        default=model.max_num_seqs,
        help="Sequences a worker runs at once, as the engine's flag.",
    )


def run_route_bench(args: argparse.Namespace) -> int:
    try:
        trace = load_trace(args.trace, args.max_requests)
    except OSError as exc:
        print(f"pdserve bench route: cannot read --trace {args.trace}: {exc.strerror}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"pdserve bench route: {exc}", file=sys.stderr)
        return 1
    if not trace:
        print(f"pdserve bench route: --trace {args.trace} holds no requests", file=sys.stderr)
        return 1
    if args.time_scale != 1.0:
        trace = [replace(r, arrival_s=r.arrival_s * args.time_scale) for r in trace]
    model = ServiceModel(
        token_rate=args.token_rate,
        step_overhead_s=args.step_overhead_ms / 1000,
        attention_crossover_tokens=args.attention_crossover_tokens,
        kv_read_s_per_ktoken=args.kv_read_ms_per_ktoken / 1000,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
    )
    capacity = args.blocks_per_worker or default_blocks_per_worker(trace)
    oracle = oracle_hit_rate(trace)
    policies = POLICY_NAMES if args.policy == "all" else (args.policy,)
    report: dict[str, Any] = {
        "trace": args.trace,
        "num_requests": len(trace),
        "num_workers": args.num_workers,
        "blocks_per_worker": capacity,
        "time_scale": args.time_scale,
        "oracle_hit_rate": round(oracle, 6),
        "routing_weights": vars(args.routing_weights),
        "service_model": model.to_json(),
        "policies": {},
    }
    start = time.perf_counter()
    rows = []
    for name in policies:
        try:
            result = replay(trace, name, args.num_workers, capacity, model, args.routing_weights, oracle)
        except ValueError as exc:
            print(f"pdserve bench route: {exc}", file=sys.stderr)
            return 1
        report["policies"][name] = result.to_json()
        rows.append({**vars(result), "hit_vs_oracle": result.hit_rate / oracle if oracle else float("nan")})
    report["wall_s"] = round(time.perf_counter() - start, 3)

    text = json.dumps(report, indent=2)
    print(text)
    if args.output_json:
        with open(args.output_json, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(_table(rows), file=sys.stderr)
    print(
        f"{len(trace)} requests, {args.num_workers} workers of {capacity} blocks, oracle hit rate "
        f"{oracle:.4f}; replayed in {report['wall_s']:.1f} s",
        file=sys.stderr,
    )
    return 0


def _table(rows: list[dict[str, Any]]) -> str:
    cells = [[title for _, title, _ in _TABLE]]
    cells += [[fmt.format(row[key]) for key, _, fmt in _TABLE] for row in rows]
    return aligned_columns(cells)
