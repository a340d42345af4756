"""`pdserve bench route --suite`: every workload under every setting of the sensitivity
sweep, each policy, one table, so a policy is judged on more than the trace it was tuned
on. Progress goes to stderr as each replay ends; the JSON report has every result.

Settings: as given (the base), workers N/2 and 2N (4 and 16 at the default 8), each
worker's cache halved and doubled, and the load 25 % lower and higher (arrival times
stretched by 1.25 and by 0.8)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from typing import Any

from pdserve.bench.route_sim.command import read_workload, replay_policies, table
from pdserve.bench.route_sim.goal import goal_row
from pdserve.bench.route_sim.trace_replay import default_blocks_per_worker
from pdserve.bench.route_sim.workloads import SUITE_WORKLOADS
from pdserve.bench.table import aligned_columns


def settings(num_workers: int) -> list[tuple[str, int, float, float]]:
    """(name, workers, capacity factor, time scale) of each setting of the sweep."""
    return [
        ("base", num_workers, 1.0, 1.0),
        (f"workers {max(num_workers // 2, 1)}", max(num_workers // 2, 1), 1.0, 1.0),
        (f"workers {2 * num_workers}", 2 * num_workers, 1.0, 1.0),
        ("capacity /2", num_workers, 0.5, 1.0),
        ("capacity x2", num_workers, 2.0, 1.0),
        ("load -25%", num_workers, 1.0, 1.25),
        ("load +25%", num_workers, 1.0, 0.8),
    ]


def run_suite(args: argparse.Namespace) -> int:
    workloads: list[tuple[str, str | None, str | None]] = []
    if args.trace is not None:
        workloads.append((args.trace.rsplit("/", 1)[-1].removesuffix(".jsonl"), args.trace, None))
    chosen = list(args.workload) if args.workload else list(SUITE_WORKLOADS)
    workloads += [(name, None, name) for name in chosen]
    report: dict[str, Any] = {"seed": args.seed, "event_delay_ms": args.event_delay_ms, "runs": []}
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    for label, path, workload in workloads:
        base = read_workload(args, path=path, workload=workload)
        if base is None:
            return 1
        base_capacity = args.blocks_per_worker or default_blocks_per_worker(base)
        for setting, workers, capacity_factor, time_scale in settings(args.num_workers):
            trace = (
                base if time_scale == 1.0 else [replace(r, arrival_s=r.arrival_s * time_scale) for r in base]
            )
            largest = max(len(r.hash_ids) for r in trace)
            capacity = max(round(base_capacity * capacity_factor), largest)
            run_args = argparse.Namespace(**{**vars(args), "time_scale": time_scale * args.time_scale})
            result, run_rows = replay_policies(run_args, trace, workers, capacity)
            if result is None:
                return 1
            result.update(workload=label, setting=setting)
            report["runs"].append(result)
            for row in run_rows:
                rows.append({**row, "workload": label, "setting": setting})
            print(
                f"[{time.perf_counter() - start:6.0f} s] {label}, {setting}: {len(trace)} requests, "
                f"{workers} workers of {capacity} blocks",
                file=sys.stderr,
                flush=True,
            )
    report["wall_s"] = round(time.perf_counter() - start, 3)
    text = json.dumps(report, indent=2)
    print(text)
    if args.output_json:
        with open(args.output_json, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(table(rows, first=("workload", "setting")), file=sys.stderr)
    print(goal_table(report["runs"]), file=sys.stderr)
    return 0


_GOAL_COLUMNS = [
    ("hit_vs_oracle", "hit/oracle", "{:.3f}"),
    ("load_imbalance", "imbalance", "{:.3f}"),
    ("imbalance_floor", "floor", "{:.3f}"),
    ("ttft_p50_ms", "p50 ms", "{:,.0f}"),
    ("best_ttft_p50_ms", "(best other)", "({:,.0f})"),
    ("ttft_p99_ms", "p99 ms", "{:,.0f}"),
    ("best_ttft_p99_ms", "(best other)", "({:,.0f})"),
    ("ttft_p999_ms", "p99.9 ms", "{:,.0f}"),
    ("ttft_mean_ms", "mean ms", "{:,.0f}"),
    ("best_ttft_mean_ms", "(best other)", "({:,.0f})"),
    ("goal", "goal", "{}"),
]


def goal_table(runs: list[dict[str, Any]]) -> str:
    """The router's policy against the goal (goal.py), one line per workload and setting."""
    cells = [["workload", "setting"] + [title for _, title, _ in _GOAL_COLUMNS]]
    for run in runs:
        row = goal_row(run)
        if row is not None:
            cells.append(
                [run["workload"], run["setting"]] + [fmt.format(row[k]) for k, _, fmt in _GOAL_COLUMNS]
            )
    return aligned_columns(cells) if len(cells) > 1 else "(the goal needs --policy all)"
