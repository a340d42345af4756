"""Which KV heads each tensor-parallel rank pulls from which producer rank.

Every rank of a tensor-parallel engine holds a slice of the KV heads in its own cache
[num_blocks, num_layers, 2, rank_kv_heads, block_size, head_dim], the slice
common.distributed.shard_plan assigns. A consumer rank's heads may sit on one producer
rank, be spread over several (prefill TP=1 -> decode TP=2 reads part of one rank's
heads; prefill TP=2 -> decode TP=1 gathers from both), or be replicated on several (more
ranks than KV heads: the first rank holding a head serves it). Torch-free.

A producer of tensor parallel size N > 1 adds its ranks' side channels to the
kv_transfer_params under ENDPOINTS_KEY, rank 0's first.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from common.distributed.shard_plan import kv_head_range
from kvtransfer.kv_cache_spec import KVCacheSpec

ENDPOINTS_KEY = "remote_tp_endpoints"


@dataclass(frozen=True)
class HeadPiece:
    """Heads [start, stop) of the producer rank's tensor land in local heads [start, stop)."""

    producer_rank: int
    remote_heads: tuple[int, int]  # in the producer rank's tensor
    local_heads: tuple[int, int]  # in this rank's tensor


def pull_plan(num_kv_heads: int, producer_tp: int, consumer_tp: int, consumer_rank: int) -> list[HeadPiece]:
    """The pieces consumer rank `consumer_rank` of `consumer_tp` pulls from a producer of
    `producer_tp` ranks, in head order; together they cover the rank's heads once."""
    producer_ranges = [kv_head_range(num_kv_heads, producer_tp, p) for p in range(producer_tp)]
    start, stop = kv_head_range(num_kv_heads, consumer_tp, consumer_rank)
    pieces: list[HeadPiece] = []
    head = start
    while head < stop:
        owner = next(p for p, (lo, hi) in enumerate(producer_ranges) if lo <= head < hi)
        lo, hi = producer_ranges[owner]
        end = min(stop, hi)
        pieces.append(HeadPiece(owner, (head - lo, end - lo), (head - start, end - start)))
        head = end
    return pieces


def rank_spec(spec: KVCacheSpec, tp_size: int, rank: int) -> KVCacheSpec:
    """The spec of one rank's cache, from the spec of the whole model's (all KV heads)."""
    lo, hi = kv_head_range(spec.num_kv_heads, tp_size, rank)
    return dataclasses.replace(spec, num_kv_heads=hi - lo)


def producer_endpoints(params: dict[str, Any], producer_tp: int) -> list[tuple[str, int, str | None]]:
    """(host, port, instance id) of every producer rank's side channel the params name;
    ValueError when they do not name one per rank."""
    if producer_tp == 1 and ENDPOINTS_KEY not in params:
        return [(params["remote_host"], params["remote_port"], params.get("remote_instance_id"))]
    endpoints = params.get(ENDPOINTS_KEY)
    if not (
        isinstance(endpoints, list)
        and len(endpoints) == producer_tp
        and all(
            isinstance(e, list | tuple)
            and len(e) == 3
            and isinstance(e[0], str)
            and isinstance(e[2], str)
            and isinstance(e[1], int)
            and not isinstance(e[1], bool)
            and 0 < e[1] < 65536
            for e in endpoints
        )
    ):
        raise ValueError(
            f"bad kv_transfer_params: {ENDPOINTS_KEY} must list [host, port, instance id] for each of the "
            f"producer's {producer_tp} tensor-parallel ranks, got {endpoints!r}"
        )
    return [(host, port, instance) for host, port, instance in endpoints]


def is_multi_rank_pull(params: Any, consumer_tp: int) -> bool:
    """Whether a pull needs the per-rank plan: either side runs more than one rank."""
    if not isinstance(params, dict):
        return False
    producer_tp = params.get("tp_size", 1)
    return consumer_tp > 1 or ENDPOINTS_KEY in params or (isinstance(producer_tp, int) and producer_tp > 1)
