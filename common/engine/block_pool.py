"""The KV-cache blocks of one worker: reference counts, the free queue in eviction order,
and the hash -> block map of cached full blocks (the prefix cache). It records the
KV events (BlockStored, BlockRemoved, AllBlocksCleared) that its changes cause.

Block 0 is the null block and is never handed out: block tables are padded with 0 and
padded rows (a captured CUDA graph's, for one) may write there, so no request's data may
live in it. A pool of N blocks therefore has N - 1 usable blocks.

Eviction order: the free queue's head goes first. A freed block without a hash holds
nothing reusable, so it joins the head; a freed cached block joins the tail, so the
least recently used cached block is evicted first. Callers free a request's blocks
tail-first, so a prompt's later blocks leave the cache before its earlier ones.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from common.block_hash import ExtraKey, event_hash, published_extra_keys
from common.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

NULL_BLOCK_ID = 0


@dataclass(eq=False)
class KVCacheBlock:
    block_id: int
    ref_cnt: int = 0  # requests holding the block
    block_hash: bytes | None = None  # set while the block is in the prefix cache


class BlockPool:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_caching: bool = True,
        enable_kv_cache_events: bool = False,
        medium: str | None = "GPU",
    ) -> None:
        if num_blocks < 2:
            raise ValueError(
                f"the KV cache needs at least 2 blocks (block 0 is reserved), got {num_blocks}; "
                "give the cache more memory or lower --block-size"
            )
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        # events pile up until take_events(); off unless someone publishes them
        self.enable_kv_cache_events = enable_kv_cache_events
        self.medium = medium
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        # block id -> block, head first; an OrderedDict removes from the middle in O(1)
        self._free: OrderedDict[int, KVCacheBlock] = OrderedDict(
            (b.block_id, b) for b in self.blocks if b.block_id != NULL_BLOCK_ID
        )
        self._cached: dict[bytes, KVCacheBlock] = {}
        self._events: list[KVEvent] = []

    # -- state ------------------------------------------------------------------

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks that get_new_blocks can hand out, cached ones (evictable) included."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of usable blocks held by requests, 0 to 1."""
        return 1.0 - len(self._free) / self.num_usable_blocks

    def get_cached_block(self, block_hash: bytes) -> KVCacheBlock | None:
        return self._cached.get(block_hash)

    def cached_hashes(self) -> set[bytes]:
        return set(self._cached)

    def is_free(self, block: KVCacheBlock) -> bool:
        return block.block_id in self._free

    # -- allocation ---------------------------------------------------------------

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Take `num_blocks` blocks from the free queue's head (ref_cnt 1 each), evicting
        the cached ones among them from the prefix cache."""
        if num_blocks > len(self._free):
            raise ValueError(
                f"asked for {num_blocks} KV blocks but only {len(self._free)} are free; "
                "check num_free_blocks first"
            )
        evicted: list[int] = []
        blocks = []
        for _ in range(num_blocks):
            _, block = self._free.popitem(last=False)
            if block.block_hash is not None:
                del self._cached[block.block_hash]
                evicted.append(event_hash(block.block_hash))
                block.block_hash = None
            block.ref_cnt = 1
            blocks.append(block)
        if evicted and self.enable_kv_cache_events:
            self._events.append(BlockRemoved(block_hashes=evicted, medium=self.medium))
        return blocks

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take one more reference to each block (prefix-cache hits); a free one leaves the queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def free_blocks(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Drop one reference to each block, in the order given; one that reaches 0 becomes free."""
        for block in blocks:
            if block.ref_cnt <= 0:
                raise RuntimeError(f"KV block {block.block_id} freed more often than it was taken")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = block
                if block.block_hash is None:
                    self._free.move_to_end(block.block_id, last=False)

    # -- prefix cache -------------------------------------------------------------

    def cache_full_blocks(
        self,
        blocks: Sequence[KVCacheBlock],
        block_hashes: Sequence[bytes],
        parent_block_hash: bytes | None,
        token_ids: Sequence[int],
        extra_keys: Sequence[tuple[ExtraKey, ...] | None] | None = None,
        lora: tuple[int, str] | None = None,
    ) -> None:
        """Enter consecutive full blocks of one request into the prefix cache.

        `block_hashes[i]` is the hash of `blocks[i]`, `parent_block_hash` the hash of the
        block before blocks[0] (None at the start of a request), `token_ids` the tokens of
        all these blocks, `extra_keys[i]` the tagged extra keys blocks[i] was hashed with
        (None: none for any block), published with its BlockStored, as is `lora` (the
        request's adapter id and name: BlockStored's lora_id, lora_name). A hash already cached
        in another block (two requests computed the same prefix at once) leaves this block
        out of the cache; it is freed like any other.
        """
        if not self.enable_caching:
            return
        bs = self.block_size
        if len(block_hashes) != len(blocks) or len(token_ids) != len(blocks) * bs:
            raise ValueError(
                f"cache_full_blocks: {len(blocks)} blocks need {len(blocks)} hashes and "
                f"{len(blocks) * bs} tokens, got {len(block_hashes)} and {len(token_ids)}"
            )
        if extra_keys is not None and len(extra_keys) != len(blocks):
            raise ValueError(
                f"cache_full_blocks: {len(blocks)} blocks need extra keys for each (or None), "
                f"got {len(extra_keys)}"
            )
        run_start = None  # first index of the current run of newly cached blocks
        for i, (block, block_hash) in enumerate(zip(blocks, block_hashes, strict=True)):
            newly_cached = block.block_hash is None and block_hash not in self._cached
            if newly_cached:
                block.block_hash = block_hash
                self._cached[block_hash] = block
                if run_start is None:
                    run_start = i
            elif run_start is not None:
                self._record_stored(block_hashes, parent_block_hash, token_ids, extra_keys, lora, run_start, i)
                run_start = None
        if run_start is not None:
            self._record_stored(
                block_hashes, parent_block_hash, token_ids, extra_keys, lora, run_start, len(blocks)
            )

    def _record_stored(
        self,
        block_hashes: Sequence[bytes],
        parent_block_hash: bytes | None,
        token_ids: Sequence[int],
        extra_keys: Sequence[tuple[ExtraKey, ...] | None] | None,
        lora: tuple[int, str] | None,
        start: int,
        end: int,
    ) -> None:
        if not self.enable_kv_cache_events:
            return
        parent = block_hashes[start - 1] if start > 0 else parent_block_hash
        published = None
        if extra_keys is not None and any(extra_keys[start:end]):
            published = [published_extra_keys(keys) for keys in extra_keys[start:end]]
        self._events.append(
            BlockStored(
                block_hashes=[event_hash(h) for h in block_hashes[start:end]],
                parent_block_hash=None if parent is None else event_hash(parent),
                token_ids=list(token_ids[start * self.block_size : end * self.block_size]),
                block_size=self.block_size,
                medium=self.medium,
                extra_keys=published,
                lora_id=None if lora is None else lora[0],
                lora_name=None if lora is None else lora[1],
            )
        )

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; only while no request holds a block. True when done."""
        if len(self._free) != self.num_usable_blocks:
            return False
        for block in self._cached.values():
            block.block_hash = None
        self._cached.clear()
        if self.enable_kv_cache_events:
            self._events.append(AllBlocksCleared())
        return True

    def take_events(self) -> list[KVEvent]:
        """The events recorded since the last call, oldest first."""
        events, self._events = self._events, []
        return events
