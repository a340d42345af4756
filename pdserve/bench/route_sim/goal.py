"""The routing goal, checked per replay: the router's policy ("prefix") reaches 0.96 of the
oracle's hit rate, a load imbalance of at most 1.05, and a p50, p99 and mean TTFT each at
or below the best of round_robin, least_loaded and longest_prefix. `pdserve bench route
--suite` prints one line per workload and setting saying which parts were missed."""

from __future__ import annotations

from typing import Any

from pdserve.bench.route_sim.bounds import HIT_GOAL

IMBALANCE_GOAL = 1.05
BASELINES = ("round_robin", "least_loaded", "longest_prefix")
TTFT_GOALS = (("ttft_p50_ms", "p50"), ("ttft_p99_ms", "p99"), ("ttft_mean_ms", "mean"))


def goal_row(run: dict[str, Any], policy: str = "prefix") -> dict[str, Any] | None:
    """`policy`'s figures in one replay report against the goal, with the best baseline's
    TTFTs; None when the report lacks the policy or any baseline."""
    policies = run["policies"]
    if policy not in policies or any(b not in policies for b in BASELINES):
        return None
    ours = policies[policy]
    oracle = run["oracle_hit_rate"]
    row: dict[str, Any] = {
        "hit_vs_oracle": ours["hit_rate"] / oracle if oracle else float("nan"),
        "load_imbalance": ours["load_imbalance"],
        "imbalance_floor": run.get("imbalance_floor", float("nan")),
        "ttft_p999_ms": ours["ttft_p999_ms"],
    }
    missed = []
    if not row["hit_vs_oracle"] >= HIT_GOAL:
        missed.append("hit")
    if not ours["load_imbalance"] <= IMBALANCE_GOAL:
        missed.append("imbalance")
    for key, name in TTFT_GOALS:
        best = min(policies[b][key] for b in BASELINES)
        row[key] = ours[key]
        row[f"best_{key}"] = best
        if not ours[key] <= best:
            missed.append(name)
    row["goal"] = "met" if not missed else "missed: " + ", ".join(missed)
    return row
