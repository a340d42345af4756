"""How even the prefill work of a trace can be spread at all, so that a load imbalance
above the goal can be told apart from one that no routing could avoid.

The load imbalance of a replay is the busiest worker's computed prompt tokens over the
mean. Every request computes at least the tokens the oracle (one unbounded cache that
has seen every earlier prompt) lacks, since a worker's cache only ever holds blocks of
earlier prompts; so some worker computes at least the largest such amount. And a policy
that reaches `hit_goal` of the oracle's hit rate computes at most (1 - hit_goal × oracle
hit rate) of the prompt tokens in all. Together:

    imbalance ≥ largest oracle miss × workers / most total work at the hit goal

`imbalance_floor` is that bound (at least 1). `lpt_imbalance` is what an offline
partition of the least work (each request's oracle miss, largest first onto the least
loaded worker, LPT) reaches: not a bound, but what "spread evenly" means for the trace.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from pdserve.bench.trace import TRACE_BLOCK_SIZE, TraceRequest

# The hit-rate goal `pdserve bench route` checks: 0.96 of the oracle's.
HIT_GOAL = 0.96


def oracle_misses(trace: Sequence[TraceRequest], block_size: int = TRACE_BLOCK_SIZE) -> list[int]:
    """Per request, the prompt tokens the oracle does not have cached (as oracle_hit_rate
    counts them: the last prompt token is always computed)."""
    seen: set[int] = set()
    misses = []
    for r in trace:
        n = 0
        for h in r.hash_ids:
            if h not in seen:
                break
            n += 1
        misses.append(r.input_length - min(n * block_size, r.input_length - 1))
        seen.update(r.hash_ids)
    return misses


def imbalance_floor(
    trace: Sequence[TraceRequest], num_workers: int, oracle_hit_rate: float, hit_goal: float = HIT_GOAL
) -> float:
    """The least load imbalance any routing reaching `hit_goal` of `oracle_hit_rate` can have."""
    if num_workers < 1:
        raise ValueError(f"num_workers must be at least 1, got {num_workers}")
    misses = oracle_misses(trace)
    prompt_tokens = sum(r.input_length for r in trace)
    most_work = prompt_tokens * (1 - hit_goal * oracle_hit_rate)
    if not misses or most_work <= 0:
        return 1.0
    return max(1.0, max(misses) * num_workers / most_work)


def lpt_imbalance(trace: Sequence[TraceRequest], num_workers: int) -> float:
    """Max / mean of the workers' work when each request's oracle miss is placed, largest
    first, on the worker with the least so far."""
    if num_workers < 1:
        raise ValueError(f"num_workers must be at least 1, got {num_workers}")
    misses = sorted(oracle_misses(trace), reverse=True)
    total = sum(misses)
    if total <= 0:
        return 1.0
    loads = [0] * num_workers
    for m in misses:
        heapq.heapreplace(loads, loads[0] + m)
    return max(loads) * num_workers / total
