"""What an engine reports about itself: EngineStats, read by the worker's metrics and load reports.

Occupancy and cache figures are read from the scheduler and the KV-cache manager when
asked; the step counters are the engine's own.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.engine.kv_cache_manager import KVCacheManager
from common.engine.scheduler import Scheduler


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of usable blocks held by requests
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of those, tokens found there
    num_preemptions: int
    num_prompt_tokens: int  # tokens computed for prompts (and recomputed after preemption)
    num_generation_tokens: int  # tokens sampled
    num_steps: int
    num_waiting_for_remote_kv: int = 0  # admitted, their prompt's KV being pulled
    num_held_requests: int = 0  # finished prefill_only requests whose blocks a consumer may pull
    num_queued_prefill_tokens: int = 0  # prompt tokens accepted and not computed yet
    num_kv_load_failures: int = 0  # pulls that failed (recomputed or failed by the policy)


def collect_stats(
    scheduler: Scheduler,
    kv_cache_manager: KVCacheManager,
    *,
    num_prompt_tokens: int,
    num_generation_tokens: int,
    num_steps: int,
) -> EngineStats:
    return EngineStats(
        num_running=scheduler.num_running,
        num_waiting=scheduler.num_waiting,
        kv_cache_usage=kv_cache_manager.usage,
        prefix_cache_queries=kv_cache_manager.prefix_cache_queries,
        prefix_cache_hits=kv_cache_manager.prefix_cache_hits,
        num_preemptions=scheduler.num_preemptions,
        num_prompt_tokens=num_prompt_tokens,
        num_generation_tokens=num_generation_tokens,
        num_steps=num_steps,
        num_waiting_for_remote_kv=scheduler.num_waiting_for_remote_kv,
        num_held_requests=scheduler.num_held,
        num_queued_prefill_tokens=scheduler.num_queued_prefill_tokens,
        num_kv_load_failures=scheduler.num_kv_load_failures,
    )
