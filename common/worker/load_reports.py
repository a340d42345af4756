"""When a worker tells its routers how loaded it is (docs/disaggregation-flow.md).

A router that sent `Hello` gets a LoadReport at once, then after each change of the
worker's load but at most every 50 ms, and every second when nothing changes (a
heartbeat: the router marks a worker down after 3 s without one). Each report carries
the load of the serving loop's last turn, the LoRA adapters the engine holds (`loras`,
which the serving loop sets before asking; a change is reported like a change of load)
and what the worker says about itself (`info`, the --ready-file map, of which the
report takes the fields it has). Torch-free.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import Any

from common.protocol import LoadReport, WorkerRole

MIN_INTERVAL_S = 0.05
HEARTBEAT_S = 1.0
# Routers are known by their socket identity; a router that went away leaves a stale one,
# so only the most recent ones are kept.
MAX_ROUTERS = 256
# what a report takes from the worker's info (the rest of it is for launchers): neither
# the reporter's own fields nor the load, which comes from the engine's stats
_LOAD_FIELDS = ("num_running", "num_waiting", "num_queued_prefill_tokens", "kv_cache_usage")
_INFO_FIELDS = frozenset(f.name for f in fields(LoadReport)) - {
    "worker_id", "role", "engine_id", "request_id", "loras", *_LOAD_FIELDS,
}  # fmt: skip


class LoadReporter:
    def __init__(
        self,
        *,
        worker_id: str,
        role: str,
        engine_id: str,
        info: Mapping[str, Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.worker_id = worker_id
        self.role = WorkerRole(role)
        self.engine_id = engine_id
        self.info: Mapping[str, Any] = info if info is not None else {}
        self.loras: list[str] = []  # the adapters the engine holds, as of the loop's last turn
        self._clock = clock
        self.routers: OrderedDict[bytes, str] = OrderedDict()  # socket identity -> router id
        self._last_sent = -float("inf")
        self._last_load: tuple | None = None

    def add_router(self, identity: bytes, router_id: str) -> None:
        self.routers[identity] = router_id
        self.routers.move_to_end(identity)
        while len(self.routers) > MAX_ROUTERS:
            self.routers.popitem(last=False)

    def report(self, stats: Any) -> LoadReport:
        """The LoadReport of EngineStats `stats`."""
        return LoadReport(
            worker_id=self.worker_id,
            role=self.role,
            engine_id=self.engine_id,
            loras=list(self.loras),
            **load_of(stats),
            **{name: value for name, value in self.info.items() if name in _INFO_FIELDS},
        )

    def due(self, stats: Any) -> LoadReport | None:
        """The report to send every router now, or None (also when no router said hello)."""
        if not self.routers:
            return None
        load = self._reported_state(stats)
        since = self._clock() - self._last_sent
        if since >= HEARTBEAT_S or (load != self._last_load and since >= MIN_INTERVAL_S):
            self._last_sent = self._clock()
            self._last_load = load
            return self.report(stats)
        return None

    def seconds_until_due(self, stats: Any) -> float:
        """How long the loop may sleep before a report falls due (no router: a heartbeat's time)."""
        if not self.routers:
            return HEARTBEAT_S
        since = self._clock() - self._last_sent
        if self._reported_state(stats) != self._last_load:
            return max(0.0, MIN_INTERVAL_S - since)
        return max(0.0, HEARTBEAT_S - since)

    def _reported_state(self, stats: Any) -> tuple:
        """What a change is judged by: the load, and which adapters the engine holds."""
        return (*_load_of(stats), tuple(self.loras))


def load_of(stats: Any) -> dict[str, Any]:
    """The load figures of EngineStats `stats`, named as LoadReport's fields."""
    return {
        "num_running": stats.num_running,
        "num_waiting": stats.num_waiting + stats.num_waiting_for_remote_kv,
        "num_queued_prefill_tokens": stats.num_queued_prefill_tokens,
        "kv_cache_usage": float(stats.kv_cache_usage),
        "num_prompt_tokens_total": getattr(stats, "num_prompt_tokens", 0),  # a counter, not a change of load
    }


def _load_of(stats: Any) -> tuple:
    """What a change of load is judged by: usage changes under 0.01 % are no change."""
    load = load_of(stats)
    load["kv_cache_usage"] = round(load["kv_cache_usage"], 4)
    return tuple(load[name] for name in _LOAD_FIELDS)
