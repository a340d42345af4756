"""The block pool: reference counts, eviction order, the hash map and its KV events.

The property test drives the pool through the KV-cache manager with random admissions
(with prefix-cache hits), chunked steps, frees and cache resets, and checks after every
step that no block leaks, no reference count goes wrong, the hash map matches the
blocks, every cache hit holds exactly the tokens it claims, and replaying the emitted
events reproduces the pool's cached set.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from common.block_hash import event_hash, hash_request_blocks
from common.engine.block_pool import NULL_BLOCK_ID, BlockPool
from common.engine.kv_cache_manager import KVCacheManager
from common.engine.request import Request
from common.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
from common.sampling_params import SamplingParams


def _cache(pool: BlockPool, blocks, tokens, parent=None):
    """Enter `blocks` holding `tokens` (a chain starting after `parent`); returns their hashes."""
    hashes = hash_request_blocks(tokens, pool.block_size, parent=parent)
    pool.cache_full_blocks(blocks, hashes, parent, tokens)
    return hashes


def test_block_zero_is_reserved_and_never_handed_out():
    pool = BlockPool(num_blocks=5, block_size=4)
    assert pool.num_usable_blocks == pool.num_free_blocks == 4
    blocks = pool.get_new_blocks(4)
    assert sorted(b.block_id for b in blocks) == [1, 2, 3, 4]
    assert NULL_BLOCK_ID not in {b.block_id for b in blocks}
    assert pool.num_free_blocks == 0 and pool.usage == 1.0


def test_too_small_a_pool_is_refused():
    with pytest.raises(ValueError, match="at least 2 blocks"):
        BlockPool(num_blocks=1, block_size=4)


def test_new_blocks_hold_one_reference_and_come_back_when_freed():
    pool = BlockPool(num_blocks=4, block_size=2)
    blocks = pool.get_new_blocks(2)
    assert [b.ref_cnt for b in blocks] == [1, 1]
    assert pool.usage == pytest.approx(2 / 3)
    pool.free_blocks(blocks)
    assert pool.num_free_blocks == 3 and [b.ref_cnt for b in blocks] == [0, 0]
    with pytest.raises(RuntimeError, match="freed more often"):
        pool.free_blocks(blocks[:1])


def test_asking_for_more_blocks_than_free_is_an_error():
    pool = BlockPool(num_blocks=3, block_size=2)
    with pytest.raises(ValueError, match="only 2 are free"):
        pool.get_new_blocks(3)


def test_touch_takes_a_cached_block_out_of_the_free_queue():
    pool = BlockPool(num_blocks=3, block_size=2)
    (block,) = pool.get_new_blocks(1)
    (h,) = _cache(pool, [block], [5, 6])
    pool.free_blocks([block])
    assert pool.is_free(block) and pool.get_cached_block(h) is block
    pool.touch([block])
    pool.touch([block])
    assert block.ref_cnt == 2 and not pool.is_free(block) and pool.num_free_blocks == 1
    pool.free_blocks([block, block])
    assert pool.is_free(block) and pool.get_cached_block(h) is block


def test_least_recently_freed_cached_block_is_evicted_first_and_reported():
    pool = BlockPool(num_blocks=4, block_size=2, enable_kv_cache_events=True)
    a, b, c = pool.get_new_blocks(3)
    ha, hb, hc = _cache(pool, [a, b, c], [1, 2, 3, 4, 5, 6])
    pool.take_events()
    pool.free_blocks([c, a, b])  # c freed first: least recently used
    (first,) = pool.get_new_blocks(1)
    assert first is c and c.block_hash is None and pool.get_cached_block(hc) is None
    assert pool.take_events() == [BlockRemoved(block_hashes=[event_hash(hc)], medium="GPU")]
    second, third = pool.get_new_blocks(2)
    assert (second, third) == (a, b)
    assert pool.take_events() == [BlockRemoved(block_hashes=[event_hash(ha), event_hash(hb)], medium="GPU")]
    assert pool.num_cached_blocks == 0


def test_uncached_free_blocks_go_before_cached_ones():
    pool = BlockPool(num_blocks=4, block_size=2)
    a, b, c = pool.get_new_blocks(3)
    (ha,) = _cache(pool, [a], [1, 2])
    pool.free_blocks([a])
    pool.free_blocks([b, c])  # no hashes: nothing worth keeping
    assert {blk.block_id for blk in pool.get_new_blocks(2)} == {b.block_id, c.block_id}
    assert pool.get_cached_block(ha) is a


def test_storing_blocks_emits_one_event_with_parent_tokens_size_and_medium():
    pool = BlockPool(num_blocks=4, block_size=2, enable_kv_cache_events=True, medium="CPU")
    a, b, c = pool.get_new_blocks(3)
    (ha,) = _cache(pool, [a], [1, 2])
    hb, hc = _cache(pool, [b, c], [3, 4, 5, 6], parent=ha)
    assert pool.take_events() == [
        BlockStored([event_hash(ha)], None, [1, 2], 2, medium="CPU"),
        BlockStored([event_hash(hb), event_hash(hc)], event_hash(ha), [3, 4, 5, 6], 2, medium="CPU"),
    ]
    assert pool.take_events() == []


def test_a_hash_cached_elsewhere_is_not_stored_twice_and_splits_the_event():
    pool = BlockPool(num_blocks=6, block_size=1, enable_kv_cache_events=True)
    first = pool.get_new_blocks(1)
    tokens = [7, 8, 9]
    h = hash_request_blocks(tokens, 1)
    pool.cache_full_blocks(first, h[1:2], h[0], tokens[1:2])  # block 1 of the chain, elsewhere
    pool.take_events()
    mine = pool.get_new_blocks(3)
    pool.cache_full_blocks(mine, h, None, tokens)
    assert mine[1].block_hash is None and pool.get_cached_block(h[1]) is first[0]
    assert pool.take_events() == [
        BlockStored([event_hash(h[0])], None, [7], 1, medium="GPU"),
        BlockStored([event_hash(h[2])], event_hash(h[1]), [9], 1, medium="GPU"),
    ]


def test_mismatched_hashes_or_tokens_are_refused():
    pool = BlockPool(num_blocks=3, block_size=2)
    blocks = pool.get_new_blocks(2)
    with pytest.raises(ValueError, match="need 2 hashes and 4 tokens"):
        pool.cache_full_blocks(blocks, [b"x"], None, [1, 2, 3, 4])


def test_reset_prefix_cache_waits_until_no_block_is_held():
    pool = BlockPool(num_blocks=4, block_size=2, enable_kv_cache_events=True)
    a, b = pool.get_new_blocks(2)
    _cache(pool, [a], [1, 2])
    pool.free_blocks([a])
    pool.take_events()
    assert not pool.reset_prefix_cache()
    assert pool.num_cached_blocks == 1 and pool.take_events() == []
    pool.free_blocks([b])
    assert pool.reset_prefix_cache()
    assert pool.num_cached_blocks == 0 and a.block_hash is None
    assert pool.take_events() == [AllBlocksCleared()]


def test_events_are_not_kept_unless_enabled():
    pool = BlockPool(num_blocks=3, block_size=2)
    (a,) = pool.get_new_blocks(1)
    _cache(pool, [a], [1, 2])
    pool.free_blocks([a])
    pool.get_new_blocks(2)
    assert pool.take_events() == []


def test_caching_disabled_stores_nothing():
    pool = BlockPool(num_blocks=3, block_size=2, enable_caching=False, enable_kv_cache_events=True)
    (a,) = pool.get_new_blocks(1)
    _cache(pool, [a], [1, 2])
    assert a.block_hash is None and pool.num_cached_blocks == 0 and pool.take_events() == []


# ---------------------------------------------------------------------------
# property test

BLOCK_SIZE = 2
# shared prefixes make cache hits frequent
PREFIXES = [[], [1, 2, 3, 4], [1, 2, 3, 4, 5, 6, 7], [9, 9, 9, 9, 9, 9], [1, 2, 8, 8]]


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pool: BlockPool | None = None
        self.requests: dict[str, Request] = {}
        self.pending: dict[str, int] = {}  # tokens allocated for, not yet computed
        self.written: dict[int, dict[int, int]] = {}  # block id -> offset -> token (the "KV")
        self.replayed: set[int] = set()  # cached hashes according to the events
        self.next_id = 0

    @precondition(lambda self: self.pool is None)
    @rule(num_blocks=st.integers(2, 14))
    def make_pool(self, num_blocks):
        self.pool = BlockPool(num_blocks, BLOCK_SIZE, enable_caching=True, enable_kv_cache_events=True)
        self.kv = KVCacheManager(self.pool, BLOCK_SIZE, enable_caching=True)

    @precondition(lambda self: self.pool is not None)
    @rule(data=st.data())
    def admit(self, data):
        prompt = data.draw(st.sampled_from(PREFIXES)) + data.draw(st.lists(st.integers(1, 4), max_size=6))
        if not prompt:
            prompt = [1]
        request = Request(
            f"r{self.next_id}", prompt, SamplingParams(), cache_salt=data.draw(st.sampled_from([None, "s"]))
        )
        self.next_id += 1
        hits, num_hit = self.kv.get_computed_blocks(request)
        assert num_hit == len(hits) * BLOCK_SIZE < request.num_tokens
        for i, block in enumerate(hits):  # a hit holds exactly the tokens it stands for
            expected = request.all_token_ids[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE]
            assert [self.written[block.block_id].get(o) for o in range(BLOCK_SIZE)] == expected
        num_new = data.draw(st.integers(1, request.num_tokens - num_hit))
        free_before, refs_before = self.pool.num_free_blocks, [b.ref_cnt for b in hits]
        if self.kv.allocate_slots(request, num_new, hits) is None:
            assert self.pool.num_free_blocks == free_before
            assert [b.ref_cnt for b in hits] == refs_before
            assert self.kv.get_block_ids(request.request_id) == []
            return
        request.num_computed_tokens = num_hit
        self.requests[request.request_id] = request
        self.pending[request.request_id] = num_new

    @precondition(lambda self: self.requests)
    @rule(data=st.data())
    def step(self, data):
        rid = data.draw(st.sampled_from(sorted(self.requests)))
        request = self.requests[rid]
        blocks = self.kv.get_blocks(rid)
        start, end = request.num_computed_tokens, request.num_computed_tokens + self.pending[rid]
        for pos in range(start, end):  # the model writes K/V of the computed tokens
            block = blocks[pos // BLOCK_SIZE]
            self.written.setdefault(block.block_id, {})[pos % BLOCK_SIZE] = request.all_token_ids[pos]
        request.num_computed_tokens = end
        if end == request.num_tokens:
            request.append_output_token(data.draw(st.integers(1, 4)))
        self.kv.cache_blocks(request)
        num_new = data.draw(st.integers(1, request.num_tokens - request.num_computed_tokens))
        if self.kv.allocate_slots(request, num_new) is None:
            self.pending[rid] = 0
            self._free(rid)  # as a preemption would
        else:
            self.pending[rid] = num_new

    @precondition(lambda self: self.requests)
    @rule(data=st.data())
    def free(self, data):
        self._free(data.draw(st.sampled_from(sorted(self.requests))))

    @precondition(lambda self: self.pool is not None)
    @rule()
    def reset_prefix_cache(self):
        if self.kv.reset_prefix_cache():
            assert self.pool.num_cached_blocks == 0

    def _free(self, rid):
        self.kv.free(self.requests.pop(rid))
        del self.pending[rid]
        assert self.kv.get_block_ids(rid) == []

    @invariant()
    def no_leak_and_sound_ref_counts(self):
        if self.pool is None:
            return
        holders: dict[int, int] = {}
        for rid, request in self.requests.items():
            ids = self.kv.get_block_ids(rid)
            assert len(ids) == len(set(ids)) and NULL_BLOCK_ID not in ids
            assert len(ids) * BLOCK_SIZE >= request.num_computed_tokens + self.pending[rid]
            for block_id in ids:
                holders[block_id] = holders.get(block_id, 0) + 1
        in_use = 0
        for block in self.pool.blocks[1:]:
            assert block.ref_cnt >= 0
            assert block.ref_cnt == holders.get(block.block_id, 0)
            assert self.pool.is_free(block) == (block.ref_cnt == 0)
            in_use += block.ref_cnt > 0
        assert self.pool.num_free_blocks + in_use == self.pool.num_usable_blocks

    @invariant()
    def hash_map_matches_blocks_and_events(self):
        if self.pool is None:
            return
        with_hash = [b for b in self.pool.blocks if b.block_hash is not None]
        for block in with_hash:
            assert self.pool.get_cached_block(block.block_hash) is block
        assert self.pool.cached_hashes() == {b.block_hash for b in with_hash}
        assert self.pool.num_cached_blocks == len(with_hash)
        for event in self.pool.take_events():
            if isinstance(event, BlockStored):
                assert event.block_size == BLOCK_SIZE
                assert len(event.token_ids) == BLOCK_SIZE * len(event.block_hashes)
                for h in event.block_hashes:
                    assert h not in self.replayed, "stored twice without a removal"
                    self.replayed.add(h)
            elif isinstance(event, BlockRemoved):
                for h in event.block_hashes:
                    self.replayed.remove(h)
            else:
                assert isinstance(event, AllBlocksCleared)
                self.replayed.clear()
        assert self.replayed == {event_hash(h) for h in self.pool.cached_hashes()}

    def teardown(self):
        if self.pool is None:
            return
        for rid in list(self.requests):
            self._free(rid)
        assert self.pool.num_free_blocks == self.pool.num_usable_blocks
        assert all(b.ref_cnt == 0 for b in self.pool.blocks)


PoolMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_block_pool_and_kv_cache_manager_under_random_operations = PoolMachine.TestCase
