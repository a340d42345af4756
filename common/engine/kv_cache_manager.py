"""Which KV blocks each request holds, and which it may reuse from the prefix cache.

A request's blocks cover its tokens in order: block i holds tokens
[i * block_size, (i + 1) * block_size). Prefix-cache lookups follow the chained block
hashes of common/block_hash.py, kept incrementally in request.block_hashes. A block
enters the cache once all its tokens have been computed (cache_blocks, after each
step), never before, so no request can hit a block whose K/V are not written yet.
"""

from __future__ import annotations

from common.block_hash import block_extra_keys, hash_request_blocks
from common.engine.block_pool import BlockPool, KVCacheBlock
from common.engine.request import Request
from common.kv_events import KVEvent


class KVCacheManager:
    def __init__(
        self,
        block_pool: BlockPool,
        block_size: int,
        enable_caching: bool = True,
        hash_algo: str = "sha256",
    ) -> None:
        if block_size != block_pool.block_size:
            raise ValueError(f"block_size {block_size} differs from the pool's {block_pool.block_size}")
        self.pool = block_pool
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.hash_algo = hash_algo
        self._blocks: dict[str, list[KVCacheBlock]] = {}
        # how many of a request's leading blocks are already in the prefix cache (or were hits)
        self._num_cached_blocks: dict[str, int] = {}
        # prefix-cache stats, in tokens, counted once per admitted request
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # -- state ------------------------------------------------------------------

    @property
    def usage(self) -> float:
        return self.pool.usage

    @property
    def capacity_tokens(self) -> int:
        """The most tokens one request could ever hold: every usable block."""
        return self.pool.num_usable_blocks * self.block_size

    def get_blocks(self, request_id: str) -> list[KVCacheBlock]:
        return self._blocks.get(request_id, [])

    def get_block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self._blocks.get(request_id, ())]

    def take_events(self) -> list[KVEvent]:
        return self.pool.take_events()

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()

    # -- hashing ------------------------------------------------------------------

    def update_block_hashes(self, request: Request) -> None:
        """Extend request.block_hashes to every full block of its tokens."""
        hashes = request.block_hashes
        bs = self.block_size
        num_full = request.num_tokens // bs
        if len(hashes) >= num_full:
            return
        start = len(hashes)
        hashes += hash_request_blocks(
            request.all_token_ids[start * bs : num_full * bs],
            bs,
            self.hash_algo,
            cache_salt=request.cache_salt,
            parent=hashes[-1] if hashes else None,
            lora=None if request.lora is None else request.lora.hash_key,
        )

    # -- allocation ---------------------------------------------------------------

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """The longest cached prefix of a request that holds no blocks yet: (blocks, tokens).

        Never the whole sequence: the last token is always left to compute, so the step
        has logits to sample from. Touches nothing; pass the blocks to allocate_slots.
        """
        if not self.enable_caching:
            return [], 0
        self.update_block_hashes(request)
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVCacheBlock] = []
        for block_hash in request.block_hashes[:max_hit_blocks]:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        computed_blocks: list[KVCacheBlock] | None = None,
    ) -> list[KVCacheBlock] | None:
        """Give the request blocks for `num_new_tokens` more tokens; the new blocks, or None.

        The request then covers request.num_computed_tokens + len(computed_blocks) *
        block_size + num_new_tokens tokens. `computed_blocks` (prefix hits from
        get_computed_blocks) is only for a request that holds no blocks yet. None means
        too few free blocks, and then nothing was touched.
        """
        rid = request.request_id
        held = self._blocks.get(rid)
        hits = computed_blocks or []
        if hits and (held or request.num_computed_tokens):
            raise ValueError(
                f"request {rid}: prefix hits can only be added before it holds blocks or has computed tokens"
            )
        num_held = len(held) if held else 0
        total_tokens = request.num_computed_tokens + len(hits) * self.block_size + num_new_tokens
        num_needed = -(-total_tokens // self.block_size) - num_held - len(hits)
        # hits sitting in the free queue stop being free once touched
        num_hits_free = sum(1 for b in hits if b.ref_cnt == 0)
        if num_needed > self.pool.num_free_blocks - num_hits_free:
            return None

        if held is None:
            held = self._blocks[rid] = []
            self._num_cached_blocks[rid] = 0
            if self.enable_caching:
                self.prefix_cache_queries += request.num_tokens
                self.prefix_cache_hits += len(hits) * self.block_size
        if hits:
            self.pool.touch(hits)
            held.extend(hits)
            self._num_cached_blocks[rid] = len(hits)
        new_blocks = self.pool.get_new_blocks(num_needed) if num_needed > 0 else []
        held.extend(new_blocks)
        return new_blocks

    def cache_blocks(self, request: Request) -> None:
        """Enter the request's newly computed full blocks into the prefix cache."""
        if not self.enable_caching:
            return
        rid = request.request_id
        blocks = self._blocks.get(rid)
        if not blocks:
            return
        self.update_block_hashes(request)
        bs = self.block_size
        start = self._num_cached_blocks[rid]
        end = min(request.num_computed_tokens // bs, len(blocks), len(request.block_hashes))
        if end <= start:
            return
        # published with the blocks' BlockStored, so other indexers can hash as we do;
        # most requests have none, and then no per-block list is built
        lora = request.lora
        extra_keys = (
            [block_extra_keys(i, request.cache_salt, lora and lora.hash_key) for i in range(start, end)]
            if request.cache_salt or lora is not None
            else None
        )
        self.pool.cache_full_blocks(
            blocks[start:end],
            request.block_hashes[start:end],
            request.block_hashes[start - 1] if start > 0 else None,
            request.all_token_ids[start * bs : end * bs],
            extra_keys,
            None if lora is None else (lora.id, lora.name),
        )
        self._num_cached_blocks[rid] = end

    def free(self, request: Request) -> None:
        """Release every block of the request, tail first so its last blocks are evicted first."""
        blocks = self._blocks.pop(request.request_id, None)
        self._num_cached_blocks.pop(request.request_id, None)
        if blocks:
            self.pool.free_blocks(reversed(blocks))
