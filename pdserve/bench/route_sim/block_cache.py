"""A simulated worker's prefix cache: a fixed number of KV blocks, LRU eviction, and the
KV events a real worker would publish about it.

A block is pinned while a running request uses it and cannot be evicted then; when the
last user finishes it stays cached, evictable, least recently used first. A request
releases its blocks last block first, so a prefix's tail goes before its head, as in
the engine's block pool. Capacity counts every cached block plus the blocks running
requests have reserved for prompt blocks not computed yet, so a request is only
admitted when its whole prompt fits (`can_reserve`), and storing never has to fail.

Every change that a router must hear about is queued as a KV event (`BlockStored` with
the parent of its first block, `BlockRemoved`), consecutive ones merged, to be published
at the end of the engine step with `take_events`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from common.kv_events import BlockRemoved, BlockStored, KVEvent


class LRUBlockCache:
    def __init__(self, capacity: int, block_size: int, medium: str | None = "GPU") -> None:
        if capacity < 1:
            raise ValueError(f"a worker needs at least 1 KV block, got {capacity}")
        self.capacity = capacity
        self.block_size = block_size
        self.medium = medium
        self._users: dict[int, int] = {}  # cached block -> running requests using it (0: evictable)
        self._evictable: OrderedDict[int, None] = OrderedDict()  # unused cached blocks, oldest first
        self.num_reserved = 0  # blocks promised to running requests, not stored yet
        self.num_evicted = 0
        self.peak_blocks = 0  # most blocks cached at once
        self._events: list[KVEvent] = []

    # -- asking -----------------------------------------------------------------------------

    def __len__(self) -> int:
        """Blocks cached, in use or not."""
        return len(self._users)

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self._users

    @property
    def num_in_use(self) -> int:
        """Blocks running requests hold or have reserved: what the worker reports as used."""
        return len(self._users) - len(self._evictable) + self.num_reserved

    def cached_prefix(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of `hashes` are cached."""
        users = self._users
        n = 0
        for h in hashes:
            if h not in users:
                break
            n += 1
        return n

    def can_reserve(self, num_blocks: int) -> bool:
        return self.num_in_use + num_blocks <= self.capacity

    def can_admit(self, hashes: Sequence[int], hit: int) -> bool:
        """Whether a prompt of `hashes`, its first `hit` cached, fits: pinning a cached block
        nobody uses counts against the room as much as reserving a new one."""
        idle_hits = sum(1 for h in hashes[:hit] if h in self._evictable)
        return self.can_reserve(len(hashes) - hit + idle_hits)

    def blocks(self) -> set[int]:
        return set(self._users)

    # -- changing ---------------------------------------------------------------------------

    def use(self, hashes: Sequence[int]) -> None:
        """Pin cached blocks for a request that reuses them."""
        for h in hashes:
            self._pin(h)

    def reserve(self, num_blocks: int) -> None:
        if not self.can_reserve(num_blocks):
            raise ValueError(
                f"cannot reserve {num_blocks} blocks: {self.num_in_use} of {self.capacity} are in use"
            )
        self.num_reserved += num_blocks

    def store(self, hashes: Sequence[int], parent: int | None) -> None:
        """Blocks a request just computed, `parent` the block before the first (None at the
        start of a prompt). Each takes one of the request's reserved blocks; one that is
        cached already (another request computed it meanwhile) is shared and gives its
        reservation back. Pinned for the request either way."""
        if len(hashes) > self.num_reserved:
            raise ValueError(f"storing {len(hashes)} blocks with only {self.num_reserved} reserved")
        for h in hashes:
            self.num_reserved -= 1
            if h in self._users:
                self._pin(h)
            else:
                self._make_room()
                self._users[h] = 1
                self.peak_blocks = max(self.peak_blocks, len(self._users))
                self._note_stored(h, parent)
            parent = h

    def release(self, hashes: Sequence[int], unused_reservation: int = 0) -> None:
        """A request finished: unpin its blocks (last first) and return what it reserved but
        never stored."""
        self.num_reserved -= unused_reservation
        for h in reversed(hashes):
            users = self._users[h] - 1
            self._users[h] = users
            if users == 0:
                self._evictable[h] = None

    def take_events(self) -> list[KVEvent]:
        """The events since the last call, in order."""
        events, self._events = self._events, []
        return events

    # -- inside -----------------------------------------------------------------------------

    def _pin(self, h: int) -> None:
        users = self._users[h]
        if users == 0:
            del self._evictable[h]
        self._users[h] = users + 1

    def _make_room(self) -> None:
        # Room for one more block beside the other reservations. Those were counted in
        # num_in_use at admission, so while the cache is too full an evictable block is there.
        while len(self._users) + self.num_reserved + 1 > self.capacity:
            victim, _ = self._evictable.popitem(last=False)
            del self._users[victim]
            self.num_evicted += 1
            last = self._events[-1] if self._events else None
            if isinstance(last, BlockRemoved):
                last.block_hashes.append(victim)
            else:
                self._events.append(BlockRemoved(block_hashes=[victim], medium=self.medium))

    def _note_stored(self, h: int, parent: int | None) -> None:
        last = self._events[-1] if self._events else None
        if isinstance(last, BlockStored) and parent is not None and last.block_hashes[-1] == parent:
            last.block_hashes.append(h)
            return
        self._events.append(
            BlockStored(
                block_hashes=[h],
                parent_block_hash=parent,
                token_ids=[],  # a trace has no tokens; the router's index reads hashes only
                block_size=self.block_size,
                medium=self.medium,
            )
        )
