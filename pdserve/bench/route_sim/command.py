"""`pdserve bench route`: routing quality of each policy on a request trace.

    pdserve bench route --trace mooncake_synthetic_trace.jsonl --num-workers 8 --policy all
    pdserve bench route --workload conversation --seed 0
    pdserve bench route --suite --trace mooncake_synthetic_trace.jsonl
    pdserve bench route --suite --workload conversation,agent,bursty,rag,mixed --seed 1
    pdserve bench route --workload lora --seed 0 --max-cpu-loras 4

Prints the JSON report on stdout (and to --output-json), a table on stderr. --suite
replays every workload (the trace, if given, and each synthetic one) at the given
setting and under the sensitivity sweep (suite.py), one table for all.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from typing import Any

from common.config.arg_types import human_int, int_at_least, number_above
from pdserve.bench.route_sim.bounds import imbalance_floor, lpt_imbalance
from pdserve.bench.route_sim.service_model import ServiceModel
from pdserve.bench.route_sim.trace_replay import default_blocks_per_worker, oracle_hit_rate, replay
from pdserve.bench.route_sim.workloads import WORKLOADS, generate, lora_of
from pdserve.bench.table import aligned_columns
from pdserve.bench.trace import load_trace
from router.cli import add_routing_weights_arg
from router.policy.named import LORA_POLICY_NAMES, POLICY_NAMES

_TABLE = [
    ("policy", "policy", "{}"),
    ("hit_rate", "hit", "{:.4f}"),
    ("hit_vs_oracle", "hit/oracle", "{:.4f}"),
    ("load_imbalance", "imbalance", "{:.3f}"),
    ("imbalance_floor", "imb. floor", "{:.3f}"),
    ("ttft_p50_ms", "TTFT p50 ms", "{:.0f}"),
    ("ttft_p99_ms", "TTFT p99 ms", "{:.0f}"),
    ("ttft_p999_ms", "TTFT p99.9 ms", "{:.0f}"),
    ("ttft_mean_ms", "TTFT mean ms", "{:.0f}"),
    ("decisions_per_s", "decisions/s", "{:.0f}"),
    ("kv_events_per_s", "KV events/s", "{:.0f}"),
    ("wall_s", "wall s", "{:.1f}"),
]
# in a table of replays whose requests name LoRA adapters, after hit/oracle
_LORA_COLUMN = ("lora_loads", "adapter loads", "{}")


def _workload_names(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in WORKLOADS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown workload {', '.join(unknown) or repr(text)}; choose from {', '.join(WORKLOADS)}"
        )
    return names


_positive_float = number_above(0)
_non_negative_float = number_above(0, inclusive=True)


def add_route_args(parser: argparse.ArgumentParser) -> None:
    model = ServiceModel()
    parser.add_argument(
        "--trace",
        default=None,
        help="Mooncake-format JSONL trace: one request a line with timestamp (ms), input_length, "
        "output_length and hash_ids (ids of 512-token prompt blocks; equal ids = equal prefix blocks).",
    )
    parser.add_argument(
        "--workload",
        type=_workload_names,
        default=None,
        help="Replay a synthetic workload instead of --trace: conversation (multi-turn sessions, "
        "growing prefixes), agent (long shared tool prompts, varied suffixes), bursty (on/off "
        "arrivals over shared prefixes), rag (system prompt, 1-3 popular documents, a question), "
        "mixed (all at once) or lora (each request names one of --num-loras adapters, Zipf-popular, "
        "and starts with its system prompt). With --suite, a comma-separated list. (--suite "
        "default: all but lora)",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the synthetic workloads.")
    parser.add_argument(
        "--suite",
        action="store_true",
        help="Replay every workload (--trace if given, and each synthetic one) at the given setting "
        "and with workers 4/8/16 (or N/2 and 2N), capacity /2 and x2, load -25%% and +25%%; one table.",
    )
    parser.add_argument(
        "--event-delay-ms",
        type=_non_negative_float,
        default=20.0,
        help="Delay from a worker publishing a KV-event batch or a load report to the router "
        "taking it, in ms.",
    )
    parser.add_argument(
        "--num-workers", type=int_at_least(1), default=8, help="Simulated workers to route over."
    )
    parser.add_argument(
        "--policy",
        choices=[*POLICY_NAMES, *LORA_POLICY_NAMES, "all"],
        default="all",
        help="Routing policy to replay: round_robin, least_loaded (fewest queued prefill tokens), "
        "longest_prefix (most cached blocks, ties to the least loaded, no load term), prefix (the "
        "router's own policy with --routing-weights), adapter_blind (prefix with the lora_affinity "
        "weight 0), or all of them (adapter_blind only where requests name adapters).",
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
    lora = parser.add_argument_group("LoRA adapters (the lora workload)")
    lora.add_argument(
        "--num-loras", type=int_at_least(1), default=16, help="Adapters the lora workload's requests name."
    )
    lora.add_argument(
        "--max-cpu-loras",
        type=int_at_least(1),
        default=4,
        help="Adapters a worker holds in host memory, least recently used evicted, as the engine's flag.",
    )
    lora.add_argument(
        "--lora-load-ms",
        type=_non_negative_float,
        default=model.lora_load_s * 1000,
        help="Time a worker takes to load an adapter it does not hold (disk read and copy), in ms; "
        "the engine step that admits the request naming it waits for it.",
    )


def run_route_bench(args: argparse.Namespace) -> int:
    if args.suite:
        from pdserve.bench.route_sim.suite import run_suite  # suite.py builds on this module's helpers

        return run_suite(args)
    if (args.trace is None) == (args.workload is None):
        print(
            "pdserve bench route: give one of --trace FILE or --workload NAME (or --suite)", file=sys.stderr
        )
        return 1
    if args.workload is not None and len(args.workload) > 1:
        print("pdserve bench route: give one --workload (a list is for --suite)", file=sys.stderr)
        return 1
    trace = read_workload(args, path=args.trace, workload=args.workload and args.workload[0])
    if trace is None:
        return 1
    if args.time_scale != 1.0:
        trace = [replace(r, arrival_s=r.arrival_s * args.time_scale) for r in trace]
    report, rows = replay_policies(args, trace, args.num_workers, args.blocks_per_worker)
    if report is None:
        return 1
    report["trace"] = args.trace if args.trace is not None else f"{args.workload[0]} (seed {args.seed})"
    text = json.dumps(report, indent=2)
    print(text)
    if args.output_json:
        with open(args.output_json, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(table(rows), file=sys.stderr)
    print(
        f"{len(trace)} requests, {args.num_workers} workers of {report['blocks_per_worker']} blocks, oracle "
        f"hit rate {report['oracle_hit_rate']:.4f}; replayed in {report['wall_s']:.1f} s",
        file=sys.stderr,
    )
    return 0


def read_workload(
    args: argparse.Namespace, path: str | None = None, workload: str | None = None
) -> list | None:
    """The trace at `path` or the synthetic `workload` (cut to --max-requests); None, said
    on stderr, when it cannot be had."""
    if workload is not None:
        options = {"num_adapters": args.num_loras} if workload == "lora" else {}
        trace = generate(workload, args.seed, **options)
        return trace[: args.max_requests] if args.max_requests else trace
    name = str(path)
    try:
        trace = load_trace(name, args.max_requests)
    except OSError as exc:
        print(f"pdserve bench route: cannot read --trace {name}: {exc.strerror}", file=sys.stderr)
        return None
    except ValueError as exc:
        print(f"pdserve bench route: {exc}", file=sys.stderr)
        return None
    if not trace:
        print(f"pdserve bench route: --trace {name} holds no requests", file=sys.stderr)
        return None
    return trace


def replay_policies(
    args: argparse.Namespace, trace: list, num_workers: int, blocks_per_worker: int | None
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """Every --policy over `trace`: the JSON report and one table row per policy."""
    model = ServiceModel(
        token_rate=args.token_rate,
        step_overhead_s=args.step_overhead_ms / 1000,
        attention_crossover_tokens=args.attention_crossover_tokens,
        kv_read_s_per_ktoken=args.kv_read_ms_per_ktoken / 1000,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
        lora_load_s=args.lora_load_ms / 1000,
    )
    capacity = blocks_per_worker or default_blocks_per_worker(trace)
    oracle = oracle_hit_rate(trace)
    policies = POLICY_NAMES if args.policy == "all" else (args.policy,)
    if args.policy == "all" and any(lora_of(r) is not None for r in trace):
        policies += LORA_POLICY_NAMES
    report: dict[str, Any] = {
        "num_requests": len(trace),
        "num_workers": num_workers,
        "blocks_per_worker": capacity,
        "time_scale": args.time_scale,
        "event_delay_ms": args.event_delay_ms,
        "oracle_hit_rate": round(oracle, 6),
        "imbalance_floor": round(imbalance_floor(trace, num_workers, oracle), 6),
        "lpt_imbalance": round(lpt_imbalance(trace, num_workers), 6),
        "routing_weights": vars(args.routing_weights),
        "service_model": model.to_json(),
        "max_cpu_loras": args.max_cpu_loras,
        "policies": {},
    }
    start = time.perf_counter()
    rows = []
    delay_s = args.event_delay_ms / 1000
    for name in policies:
        try:
            result = replay(
                trace,
                name,
                num_workers,
                capacity,
                model,
                args.routing_weights,
                oracle,
                delay_s,
                args.max_cpu_loras,
            )
        except ValueError as exc:
            print(f"pdserve bench route: {exc}", file=sys.stderr)
            return None, []
        report["policies"][name] = result.to_json()
        hit_vs_oracle = result.hit_rate / oracle if oracle else float("nan")
        rows.append(
            {**vars(result), "hit_vs_oracle": hit_vs_oracle, "imbalance_floor": report["imbalance_floor"]}
        )
    report["wall_s"] = round(time.perf_counter() - start, 3)
    return report, rows


def table(rows: list[dict[str, Any]], first: tuple[str, ...] = ()) -> str:
    """The table of `rows`, with the columns named in `first` (keys of the rows) in front."""
    columns = [(key, key, "{}") for key in first] + _TABLE
    if any(row.get("lora_requests") for row in rows):
        at = next(i for i, (key, _, _) in enumerate(columns) if key == "hit_vs_oracle") + 1
        columns.insert(at, _LORA_COLUMN)
    cells = [[title for _, title, _ in columns]]
    cells += [[fmt.format(row[key]) for key, _, fmt in columns] for row in rows]
    return aligned_columns(cells)
