"""The router's global prefix index: which workers hold which KV-cache blocks.

Fed by the workers' KV events (BlockStored adds blocks for a worker, BlockRemoved takes
them away, AllBlocksCleared forgets a worker's blocks) and asked, per request, how many
leading blocks of its prompt each worker already holds.

Block hashes chain their parent (common.block_hash), so one hash names a whole prefix:
a flat map hash -> workers answers the same questions a radix tree of blocks would,
with one dict lookup per block. `match` walks the prompt's hashes from block 0,
narrowing the set of workers that still hold every block so far; a worker leaves the
set at its first missing block, which is where its cached prefix ends. A worker that
holds a block but lost its parent (evicted out of order) therefore does not count it,
just as its own prefix cache would not use it.

A worker may hold one hash in several places (a GPU block and a CPU offload copy, or
several KV-cache groups); each (medium, group) is one bit of the worker's mask for the
hash, and the worker holds the block while any bit is set. A BlockRemoved that names
neither medium nor group (older publishers) removes every copy. Entries go away with the
events that remove them, so memory follows what the workers hold.

All methods are thread-safe: the event subscriber writes while the router's request
handlers read. Torch-free.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterable, Sequence

from common.block_hash import event_hash, hash_request_blocks
from common.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent, KVEventBatch

WorkerId = Hashable


def request_block_hashes(
    token_ids: Sequence[int],
    block_size: int,
    algo: str = "sha256",
    cache_salt: str | None = None,
    lora: tuple[str, str] | None = None,
) -> list[int]:
    """The prompt's full-block hashes as KV events carry them (64-bit ints), for `match`.

    `algo` must be the workers' --prefix-caching-hash-algo and the NONE_HASH seed the
    same in the router and the workers (common/block_hash.py shared_hash_seed), or
    nothing will ever match. A salt enters block 0 and a LoRA adapter's (name, path)
    every block as vLLM 0.33 hashes them, so salted prompts and adapters' prompts match
    stock vLLM workers too, and a prompt cached under one adapter never matches another.
    """
    return [event_hash(h) for h in hash_request_blocks(token_ids, block_size, algo, cache_salt, lora=lora)]


def _as_int(block_hash: int | bytes) -> int:
    # The one place event hashes are normalized: publishers that send the full digest as
    # bytes (vLLM with VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0) are read as the 64-bit form
    # the router computes (common.block_hash.event_hash).
    return block_hash if type(block_hash) is int else event_hash(block_hash)  # type: ignore[arg-type]


class PrefixIndex:
    def __init__(self) -> None:
        self._holders: dict[int, set[WorkerId]] = {}  # block hash -> workers holding it
        self._held: dict[WorkerId, dict[int, int]] = {}  # worker -> block hash -> placement mask
        self._placement_bits: dict[tuple[str | None, int | None], int] = {}
        self._lock = threading.Lock()
        self.num_events_applied = 0

    # -- feeding ------------------------------------------------------------------------

    def apply_batch(self, worker_id: WorkerId, batch: KVEventBatch) -> None:
        """Apply every event of one batch from `worker_id`, in order."""
        with self._lock:
            for event in batch.events:
                self._apply(worker_id, event)

    def apply_event(self, worker_id: WorkerId, event: KVEvent) -> None:
        with self._lock:
            self._apply(worker_id, event)

    def remove_worker(self, worker_id: WorkerId) -> None:
        """Forget every block of `worker_id` (it left, restarted or cleared its cache)."""
        with self._lock:
            self._drop_worker(worker_id)

    def _apply(self, worker_id: WorkerId, event: KVEvent) -> None:
        self.num_events_applied += 1
        if isinstance(event, BlockStored):
            self._store(worker_id, event.block_hashes, self._bit(event.medium, event.group_idx))
        elif isinstance(event, BlockRemoved):
            if event.medium is None and event.group_idx is None:
                bits = -1  # a removal that names no place removes every copy
            else:
                bits = self._bit(event.medium, event.group_idx)
            self._remove(worker_id, event.block_hashes, bits)
        elif isinstance(event, AllBlocksCleared):
            self._drop_worker(worker_id)
        else:
            raise TypeError(f"not a KV event: {type(event).__name__}")

    def _bit(self, medium: str | None, group_idx: int | None) -> int:
        key = (medium, group_idx)
        bit = self._placement_bits.get(key)
        if bit is None:
            bit = self._placement_bits[key] = 1 << len(self._placement_bits)
        return bit

    def _store(self, worker_id: WorkerId, block_hashes: Iterable[int | bytes], bit: int) -> None:
        held = self._held.get(worker_id)
        if held is None:
            held = self._held[worker_id] = {}
        holders = self._holders
        for raw in block_hashes:
            h = _as_int(raw)
            mask = held.get(h, 0)
            if not mask:
                workers = holders.get(h)
                if workers is None:
                    holders[h] = {worker_id}
                else:
                    workers.add(worker_id)
            held[h] = mask | bit

    def _remove(self, worker_id: WorkerId, block_hashes: Iterable[int | bytes], bits: int) -> None:
        held = self._held.get(worker_id)
        if held is None:
            return
        holders = self._holders
        for raw in block_hashes:
            h = _as_int(raw)
            mask = held.get(h)
            if mask is None:
                continue  # never heard of it: an event we missed, or a duplicate removal
            mask &= ~bits
            if mask:
                held[h] = mask
                continue
            del held[h]
            workers = holders[h]
            workers.discard(worker_id)
            if not workers:
                del holders[h]
        if not held:
            del self._held[worker_id]

    def _drop_worker(self, worker_id: WorkerId) -> None:
        held = self._held.pop(worker_id, None)
        if not held:
            return
        holders = self._holders
        for h in held:
            workers = holders[h]
            workers.discard(worker_id)
            if not workers:
                del holders[h]

    # -- asking -------------------------------------------------------------------------

    def match(self, block_hashes: Sequence[int]) -> dict[WorkerId, int]:
        """For each worker holding block 0, how many leading blocks of `block_hashes` it holds.

        Workers holding none are left out. Hashes are the 64-bit ints of the events
        (see request_block_hashes).
        """
        if not block_hashes:
            return {}
        if type(block_hashes[0]) is not int:
            block_hashes = [_as_int(h) for h in block_hashes]
        matched: dict[WorkerId, int] = {}
        holders = self._holders
        with self._lock:
            first = holders.get(block_hashes[0])
            if not first:
                return matched
            alive = set(first)
            for position in range(1, len(block_hashes)):
                workers = holders.get(block_hashes[position])
                if workers is None:
                    break
                if alive <= workers:
                    continue
                for worker_id in alive - workers:
                    matched[worker_id] = position
                alive &= workers
                if not alive:
                    return matched
            else:
                position = len(block_hashes)
            for worker_id in alive:
                matched[worker_id] = position
        return matched

    def workers(self) -> list[WorkerId]:
        """Workers holding at least one block."""
        with self._lock:
            return list(self._held)

    def num_blocks(self, worker_id: WorkerId | None = None) -> int:
        """Blocks `worker_id` holds, or, without a worker, distinct blocks held anywhere."""
        with self._lock:
            if worker_id is None:
                return len(self._holders)
            return len(self._held.get(worker_id, ()))

    def holds(self, worker_id: WorkerId, block_hash: int | bytes) -> bool:
        with self._lock:
            return _as_int(block_hash) in self._held.get(worker_id, ())

    def __len__(self) -> int:
        return self.num_blocks()
