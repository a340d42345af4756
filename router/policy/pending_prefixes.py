"""Prompts the router has sent but whose blocks the workers have not announced yet.

A worker publishes a block's KV event once it has computed it, and the event reaches the
router tens of ms later; a long prompt takes seconds to prefill. Until then the prefix
index does not show the prompt anywhere, so the next requests with the same prefix (the
other steps of an agent using the same tool prompt, a burst on one document) look like
misses everywhere and are spread over several workers, each computing the prefix again.
SGLang's cache-aware router avoids this by inserting each prompt into its tree of the
chosen worker when it routes it; this does the same for a while: a routed prompt's
blocks count as held by its worker for `ttl_s`, by when the worker's own events have
taken over (or the request failed and the claim lapses).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Sequence


class PendingPrefixes:
    def __init__(self, ttl_s: float) -> None:
        if not ttl_s > 0:
            raise ValueError(f"the pending-prefix time must be positive seconds, got {ttl_s}")
        self.ttl_s = ttl_s
        self._holders: dict[int, dict[Hashable, float]] = {}  # block hash -> worker id -> expiry
        self._expiries: deque[tuple[float, Hashable, Sequence[int]]] = deque()  # oldest first

    def __len__(self) -> int:
        """Blocks with a pending claim (expired ones may count until the next call)."""
        return len(self._holders)

    def note_sent(self, worker_id: Hashable, block_hashes: Sequence[int], now: float) -> None:
        """A prompt whose full blocks hash to `block_hashes` was sent to `worker_id` at `now`."""
        self._expire(now)
        if not block_hashes:
            return
        expiry = now + self.ttl_s
        for h in block_hashes:
            self._holders.setdefault(h, {})[worker_id] = expiry
        self._expiries.append((expiry, worker_id, block_hashes))

    def overlap(self, block_hashes: Sequence[int], now: float) -> dict[Hashable, int]:
        """Per worker with a pending claim on the first block, the leading blocks it claims."""
        self._expire(now)
        if not block_hashes or block_hashes[0] not in self._holders:
            return {}
        counts = dict.fromkeys(self._holders[block_hashes[0]], 0)
        live = set(counts)
        for h in block_hashes:
            holders = self._holders.get(h)
            if holders is None:
                break
            live &= holders.keys()
            if not live:
                break
            for worker_id in live:
                counts[worker_id] += 1
        return counts

    def _expire(self, now: float) -> None:
        while self._expiries and self._expiries[0][0] <= now:
            expiry, worker_id, block_hashes = self._expiries.popleft()
            for h in block_hashes:
                holders = self._holders.get(h)
                if holders is not None and holders.get(worker_id) == expiry:  # not claimed again since
                    del holders[worker_id]
                    if not holders:
                        del self._holders[h]
