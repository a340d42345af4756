"""Routing quality on a request trace: simulated workers (LRU prefix cache, KV events,
engine steps on a clock) driven through the router's real policy and prefix index.
`pdserve bench route` runs it. Torch-free."""

from pdserve.bench.route_sim.service_model import ServiceModel
from pdserve.bench.route_sim.trace_replay import (
    RouteResult,
    TraceReplay,
    default_blocks_per_worker,
    oracle_hit_rate,
    replay,
)
from pdserve.bench.trace import TraceRequest, load_trace

__all__ = [
    "RouteResult",
    "ServiceModel",
    "TraceReplay",
    "TraceRequest",
    "default_blocks_per_worker",
    "load_trace",
    "oracle_hit_rate",
    "replay",
]
