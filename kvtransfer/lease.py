"""The producer's record of exported blocks: who holds which, until when.

A request's blocks stay pinned until its consumer says it is done with them (a
notification) or its lease runs out, whichever comes first; either way the request
shows up once in `take_freed()`, and the worker's step loop frees its blocks. The side
channel's thread and the worker's thread both touch the table, hence the lock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass
class Lease:
    block_ids: frozenset[int]
    expires_at: float  # time.monotonic()


class LeaseTable:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._leases: dict[str, Lease] = {}
        self._freed: list[str] = []
        self.num_notified = 0
        self.num_expired = 0

    def add(self, request_id: str, block_ids: Iterable[int], duration_s: float) -> None:
        with self._lock:
            if request_id in self._leases:
                raise ValueError(
                    f"request {request_id!r} already has exported blocks; a request id may be "
                    "exported once until its blocks are freed"
                )
            self._leases[request_id] = Lease(frozenset(block_ids), time.monotonic() + duration_s)

    def holds(self, request_id: str, block_ids: Iterable[int]) -> str | None:
        """None when every block is leased to the request, else why not."""
        with self._lock:
            lease = self._leases.get(request_id)
            if lease is None or lease.expires_at <= time.monotonic():
                return (
                    f"request {request_id!r} holds no blocks here: it was never exported, "
                    "its consumer already released it, or its lease expired"
                )
            stray = [b for b in block_ids if b not in lease.block_ids]
            if stray:
                return f"blocks {stray[:8]} do not belong to request {request_id!r}"
            return None

    def notify(self, request_id: str) -> bool:
        """The consumer is done with the request; False if it held nothing (late or unknown)."""
        with self._lock:
            if self._leases.pop(request_id, None) is None:
                return False
            self._freed.append(request_id)
            self.num_notified += 1
            return True

    def take_freed(self) -> list[str]:
        """Requests whose blocks may be freed now: notified, or whose lease expired."""
        now = time.monotonic()
        with self._lock:
            expired = [rid for rid, lease in self._leases.items() if lease.expires_at <= now]
            for rid in expired:
                del self._leases[rid]
            self.num_expired += len(expired)
            freed, self._freed = self._freed + expired, []
            return freed

    def __len__(self) -> int:
        with self._lock:
            return len(self._leases)
