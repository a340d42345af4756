"""The KV-cache manager: per-request blocks, prefix-cache lookups, caching after compute."""

from __future__ import annotations

import pytest

from common.block_hash import event_hash, hash_request_blocks
from common.engine.block_pool import BlockPool
from common.engine.kv_cache_manager import KVCacheManager
from common.engine.request import Request
from common.kv_events import BlockStored
from common.sampling_params import SamplingParams

BS = 4


def _manager(num_blocks=10, caching=True, algo="sha256", events=False) -> KVCacheManager:
    pool = BlockPool(num_blocks, BS, enable_caching=caching, enable_kv_cache_events=events)
    return KVCacheManager(pool, BS, enable_caching=caching, hash_algo=algo)


def _request(rid: str, tokens: list[int], salt: str | None = None) -> Request:
    return Request(rid, tokens, SamplingParams(), cache_salt=salt)


def _run_prefill(kv: KVCacheManager, request: Request) -> None:
    """Admit the request and compute its whole prompt in one step."""
    hits, num_hit = kv.get_computed_blocks(request)
    assert kv.allocate_slots(request, request.num_tokens - num_hit, hits) is not None
    request.num_computed_tokens = request.num_tokens
    kv.cache_blocks(request)


def test_allocation_covers_the_tokens_block_by_block():
    kv = _manager()
    request = _request("a", list(range(6)))
    new = kv.allocate_slots(request, 6)
    assert len(new) == 2 and kv.get_block_ids("a") == [b.block_id for b in new]
    request.num_computed_tokens = 6
    assert kv.allocate_slots(request, 2) == []  # still fits in block 2
    request.num_computed_tokens = 8
    (third,) = kv.allocate_slots(request, 1)
    assert kv.get_block_ids("a")[-1] == third.block_id and len(kv.get_block_ids("a")) == 3


def test_failed_allocation_returns_none_and_touches_nothing():
    kv = _manager(num_blocks=4)  # 3 usable
    first = _request("a", list(range(8)))
    _run_prefill(kv, first)
    kv.free(first)  # its 2 blocks stay cached, free
    second = _request("b", list(range(8)) + [50] * 12)
    hits, num_hit = kv.get_computed_blocks(second)
    assert num_hit == 8
    assert kv.allocate_slots(second, 12, hits) is None  # needs 3 more blocks, 1 is free
    assert kv.pool.num_free_blocks == 3 and [b.ref_cnt for b in hits] == [0, 0]
    assert kv.get_block_ids("b") == [] and kv.prefix_cache_queries == 8


def test_a_cached_prefix_is_found_again_and_never_the_whole_prompt():
    kv = _manager()
    first = _request("a", list(range(8)))
    _run_prefill(kv, first)
    first_ids = kv.get_block_ids("a")
    kv.free(first)
    same = _request("b", list(range(8)))  # 2 full blocks, but the last token must be computed
    hits, num_hit = kv.get_computed_blocks(same)
    assert num_hit == 4 and [b.block_id for b in hits] == first_ids[:1]
    longer = _request("c", list(range(8)) + [99])
    hits, num_hit = kv.get_computed_blocks(longer)
    assert num_hit == 8 and [b.block_id for b in hits] == first_ids
    assert kv.allocate_slots(longer, 1, hits) is not None
    assert kv.get_block_ids("c")[:2] == first_ids and len(kv.get_block_ids("c")) == 3
    assert [b.ref_cnt for b in hits] == [1, 1]


def test_a_lookup_stops_at_the_first_missing_block():
    kv = _manager()
    _run_prefill(kv, _request("a", list(range(12))))
    other = _request("b", [0, 1, 2, 3, 9, 9, 9, 9, 8, 9, 10, 11, 5])
    assert kv.get_computed_blocks(other)[1] == 4


def test_blocks_enter_the_cache_only_once_computed():
    kv = _manager()
    request = _request("a", list(range(12)))
    assert kv.allocate_slots(request, 6) is not None  # a chunk of 6: block 0 full, block 1 half
    assert kv.get_computed_blocks(_request("probe", list(range(12))))[1] == 0
    request.num_computed_tokens = 6
    kv.cache_blocks(request)
    assert kv.get_computed_blocks(_request("probe", list(range(12))))[1] == 4
    assert kv.allocate_slots(request, 6) is not None
    request.num_computed_tokens = 12
    kv.cache_blocks(request)
    assert kv.get_computed_blocks(_request("probe", list(range(13))))[1] == 12


def test_block_hashes_grow_with_the_tokens_and_match_the_chain():
    kv = _manager(algo="sha256_cbor")
    request = _request("a", list(range(7)), salt="tenant")
    _run_prefill(kv, request)
    assert len(request.block_hashes) == 1
    for token in (100, 101, 102):
        request.append_output_token(token)
        assert kv.allocate_slots(request, 1) is not None
        request.num_computed_tokens += 1
        kv.cache_blocks(request)
    assert request.block_hashes == hash_request_blocks(
        request.all_token_ids, BS, "sha256_cbor", cache_salt="tenant"
    )
    assert len(request.block_hashes) == 2


def test_decoded_tokens_complete_blocks_that_other_requests_then_hit():
    kv = _manager()
    request = _request("a", [1, 2, 3])
    _run_prefill(kv, request)
    for token in (4, 5, 6, 7, 8):  # each step computes the token sampled the step before
        request.append_output_token(token)
        assert kv.allocate_slots(request, 1) is not None
        request.num_computed_tokens += 1
        kv.cache_blocks(request)
    assert kv.get_computed_blocks(_request("b", [1, 2, 3, 4, 5, 6, 7, 8, 0]))[1] == 8


def test_cache_salt_separates_tenants():
    kv = _manager()
    _run_prefill(kv, _request("a", list(range(9)), salt="x"))
    assert kv.get_computed_blocks(_request("b", list(range(9)), salt="x"))[1] == 8
    assert kv.get_computed_blocks(_request("c", list(range(9)), salt="y"))[1] == 0
    assert kv.get_computed_blocks(_request("d", list(range(9))))[1] == 0


def test_prefix_cache_stats_count_tokens_per_admission():
    kv = _manager()
    _run_prefill(kv, _request("a", list(range(9))))
    _run_prefill(kv, _request("b", list(range(10))))
    assert kv.prefix_cache_queries == 19 and kv.prefix_cache_hits == 8


def test_freed_request_loses_its_last_blocks_first():
    kv = _manager(num_blocks=5)  # 4 usable
    request = _request("a", list(range(13)))
    _run_prefill(kv, request)  # 3 full cached blocks + 1 partial
    ids = kv.get_block_ids("a")
    kv.free(request)
    assert kv.pool.num_free_blocks == 4
    kv.allocate_slots(_request("x", [0]), 1)  # takes the uncached partial block
    kv.allocate_slots(_request("y", [0]), 1)  # evicts the prompt's last cached block
    assert kv.get_block_ids("x") == [ids[3]] and kv.get_block_ids("y") == [ids[2]]
    assert kv.get_computed_blocks(_request("b", list(range(13))))[1] == 8


def test_two_requests_computing_the_same_prefix_store_it_once():
    kv = _manager(events=True)
    a, b = _request("a", list(range(9))), _request("b", list(range(9)))
    for r in (a, b):  # admitted in the same step: neither can hit the other
        assert kv.get_computed_blocks(r)[1] == 0
        kv.allocate_slots(r, 9)
    for r in (a, b):
        r.num_computed_tokens = 9
        kv.cache_blocks(r)
    events = kv.take_events()
    hashes = hash_request_blocks(list(range(9)), BS)
    assert events == [BlockStored([event_hash(h) for h in hashes], None, list(range(8)), BS, medium="GPU")]
    kv.free(a)
    kv.free(b)
    assert kv.pool.num_free_blocks == kv.pool.num_usable_blocks


def test_prefix_hits_are_only_for_a_request_without_blocks():
    kv = _manager()
    _run_prefill(kv, _request("a", list(range(9))))
    request = _request("b", list(range(9)))
    hits, _ = kv.get_computed_blocks(request)
    kv.allocate_slots(request, 1)
    with pytest.raises(ValueError, match="prefix hits"):
        kv.allocate_slots(request, 1, hits)


def test_without_caching_nothing_is_hashed_or_hit():
    kv = _manager(caching=False, events=True)
    request = _request("a", list(range(9)))
    _run_prefill(kv, request)
    kv.free(request)
    again = _request("b", list(range(9)))
    assert kv.get_computed_blocks(again) == ([], 0)
    assert request.block_hashes == [] and kv.take_events() == []
    assert kv.prefix_cache_queries == 0


def test_usage_and_capacity():
    kv = _manager(num_blocks=5)
    assert kv.capacity_tokens == 16 and kv.usage == 0.0
    kv.allocate_slots(_request("a", list(range(8))), 8)
    assert kv.usage == 0.5
