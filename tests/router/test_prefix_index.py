"""The router's prefix index: leading cached blocks per worker, kept exactly in step with
the workers' KV events, and nothing left behind when blocks go away."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from common.block_hash import hash_request_blocks
from common.engine.block_pool import BlockPool
from common.engine.kv_cache_manager import KVCacheManager
from common.engine.request import Request
from common.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch
from common.sampling_params import SamplingParams
from pdserve.bench.prefix_index import run_benchmark, synthetic_trace
from router.policy import PolicyWeights
from router.prefix_index import PrefixIndex, request_block_hashes
from tests.common.vllm_kv_events import int_hash, reference_chain


def _stored(hashes, parent=None, medium="GPU", group_idx=None):
    return BlockStored(
        block_hashes=list(hashes),
        parent_block_hash=parent,
        token_ids=[0] * len(hashes),
        block_size=1,
        medium=medium,
        group_idx=group_idx,
    )


def test_match_counts_each_workers_leading_cached_blocks():
    index = PrefixIndex()
    index.apply_event("a", _stored([1, 2, 3, 4]))
    index.apply_event("b", _stored([1, 2]))
    index.apply_event("c", _stored([9]))
    assert index.match([1, 2, 3, 4, 5]) == {"a": 4, "b": 2}
    assert index.match([1, 2, 3]) == {"a": 3, "b": 2}
    assert index.match([9, 1]) == {"c": 1}
    assert index.match([5, 1, 2]) == {}
    assert index.match([]) == {}


def test_a_block_past_a_missing_one_does_not_count():
    index = PrefixIndex()
    index.apply_event("a", _stored([1, 2, 3, 4]))
    index.apply_event("a", BlockRemoved(block_hashes=[2], medium="GPU"))
    assert index.match([1, 2, 3, 4]) == {"a": 1}
    assert index.holds("a", 3)


def test_stores_continue_a_chain_across_events_and_batches():
    index = PrefixIndex()
    index.apply_batch("a", KVEventBatch(ts=0.0, events=[_stored([1, 2]), _stored([3], parent=2)]))
    index.apply_batch("a", KVEventBatch(ts=1.0, events=[_stored([4, 5], parent=3)]))
    assert index.match([1, 2, 3, 4, 5, 6]) == {"a": 5}


def test_all_blocks_cleared_forgets_only_that_worker():
    index = PrefixIndex()
    index.apply_event("a", _stored([1, 2]))
    index.apply_event("b", _stored([1, 2, 3]))
    index.apply_event("a", AllBlocksCleared())
    assert index.match([1, 2, 3]) == {"b": 3}
    assert index.num_blocks("a") == 0 and index.workers() == ["b"]


def test_a_worker_that_leaves_has_its_entries_dropped():
    index = PrefixIndex()
    index.apply_event("a", _stored([1, 2]))
    index.apply_event("b", _stored([1]))
    index.remove_worker("a")
    index.remove_worker("never-seen")
    assert index.match([1, 2]) == {"b": 1}
    assert index.num_blocks() == 1


def test_a_block_held_in_two_places_stays_until_both_copies_go():
    index = PrefixIndex()
    index.apply_event("a", _stored([1], medium="GPU"))
    index.apply_event("a", _stored([1], medium="CPU"))
    index.apply_event("a", BlockRemoved(block_hashes=[1], medium="GPU"))
    assert index.match([1]) == {"a": 1}
    index.apply_event("a", BlockRemoved(block_hashes=[1], medium="CPU"))
    assert index.match([1]) == {}


def test_byte_hashes_are_read_as_their_low_64_bits():
    index = PrefixIndex()
    digest = bytes(range(32))
    low64 = int.from_bytes(digest, "big") & (2**64 - 1)
    index.apply_event("a", _stored([digest]))
    assert index.match([low64]) == {"a": 1}
    assert index.match([digest]) == {"a": 1}


def test_removing_everything_leaves_the_index_empty():
    index = PrefixIndex()
    for worker in ("a", "b"):
        index.apply_event(worker, _stored(range(100)))
    index.apply_event("a", BlockRemoved(block_hashes=list(range(100))))
    index.apply_event("b", BlockRemoved(block_hashes=list(range(50)) + [12345]))
    index.apply_event("b", AllBlocksCleared())
    assert len(index) == 0 and index.workers() == []
    assert index._holders == {} and index._held == {}


def test_the_routers_hashes_match_the_events_of_a_workers_block_pool():
    block_size = 4
    prompt = list(range(100, 118))  # 4 full blocks and 2 tokens
    pool = BlockPool(num_blocks=16, block_size=block_size, enable_kv_cache_events=True)
    blocks = pool.get_new_blocks(4)
    pool.cache_full_blocks(blocks, hash_request_blocks(prompt, block_size), None, prompt[:16])
    index = PrefixIndex()
    index.apply_batch("worker-0", KVEventBatch(ts=0.0, events=pool.take_events()))

    assert index.match(request_block_hashes(prompt, block_size)) == {"worker-0": 4}
    longer = prompt[:12] + [7, 7, 7, 7]
    assert index.match(request_block_hashes(longer, block_size)) == {"worker-0": 3}
    salted = request_block_hashes(prompt, block_size, cache_salt="tenant-b")
    assert index.match(salted) == {}


def test_a_salted_request_on_a_worker_publishes_its_salt_and_the_router_finds_its_blocks():
    block_size = 4
    prompt = list(range(200, 214))  # 3 full blocks and 2 tokens
    pool = BlockPool(num_blocks=16, block_size=block_size, enable_kv_cache_events=True)
    kv = KVCacheManager(pool, block_size, hash_algo="sha256_cbor")
    request = Request("r", prompt, SamplingParams(), cache_salt="tenant-a")
    assert kv.allocate_slots(request, len(prompt)) is not None
    request.num_computed_tokens = len(prompt)
    kv.cache_blocks(request)
    events = kv.take_events()
    assert [e.extra_keys for e in events] == [[["tenant-a"], None, None]]  # untagged, block 0 only
    index = PrefixIndex()
    index.apply_batch("worker-0", KVEventBatch(ts=0.0, events=events))
    assert index.match(request_block_hashes(prompt, block_size, "sha256_cbor", "tenant-a")) == {"worker-0": 3}
    assert index.match(request_block_hashes(prompt, block_size, "sha256_cbor", "tenant-b")) == {}


def test_digest_bytes_in_events_match_the_routers_int_hashes_salted_as_vllm_salts():
    """A vLLM 0.33 worker with VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0 sends whole digests;
    the index reads them as the int form the router computes, removals included."""
    prompt = list(range(40))  # 5 blocks of 8
    seed = os.environ.get("PYTHONHASHSEED") or "vllm-none-hash"
    digests = reference_chain(prompt, 8, seed, cache_salt="tenant-a")
    index = PrefixIndex()
    index.apply_event("vllm-0", BlockStored(digests, None, prompt, 8, None, "GPU", None))
    salted = request_block_hashes(prompt, 8, "sha256_cbor", cache_salt="tenant-a")
    assert salted == [int_hash(d) for d in digests]
    assert index.match(salted) == {"vllm-0": 5}
    assert index.match(digests) == {"vllm-0": 5}  # asked with bytes, answered the same
    assert index.holds("vllm-0", salted[2]) and index.holds("vllm-0", digests[2])
    index.apply_event("vllm-0", BlockRemoved([digests[3]], "GPU"))
    assert index.match(salted) == {"vllm-0": 3}
    assert index.match(request_block_hashes(prompt, 8, "sha256_cbor")) == {}


# -- against a brute-force model --------------------------------------------------------

_workers = st.sampled_from(["a", "b", "c"])
_hashes = st.lists(st.integers(0, 12), min_size=1, max_size=6)
_media = st.sampled_from(["GPU", "CPU"])
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("store"), _workers, _hashes, _media),
        st.tuples(st.just("remove"), _workers, _hashes, st.one_of(_media, st.none())),
        st.tuples(st.just("clear"), _workers),
        st.tuples(st.just("leave"), _workers),
    ),
    max_size=40,
)


def _model_match(model: dict[str, set[tuple[int, str]]], query: list[int]) -> dict[str, int]:
    result = {}
    for worker, copies in model.items():
        held = {h for h, _ in copies}
        n = 0
        while n < len(query) and query[n] in held:
            n += 1
        if n:
            result[worker] = n
    return result


@settings(max_examples=300, deadline=None)
@given(ops=_ops, queries=st.lists(st.lists(st.integers(0, 12), max_size=8), min_size=1, max_size=8))
def test_match_agrees_with_a_brute_force_model(ops, queries):
    index = PrefixIndex()
    model: dict[str, set[tuple[int, str]]] = {}
    for op in ops:
        kind, worker = op[0], op[1]
        if kind == "store":
            index.apply_event(worker, _stored(op[2], medium=op[3]))
            model.setdefault(worker, set()).update((h, op[3]) for h in op[2])
        elif kind == "remove":
            index.apply_event(worker, BlockRemoved(block_hashes=op[2], medium=op[3]))
            copies = model.get(worker, set())
            gone = {(h, m) for h, m in copies if h in op[2] and op[3] in (m, None)}  # None: every copy
            copies.difference_update(gone)
        elif kind == "clear":
            index.apply_event(worker, AllBlocksCleared())
            model.pop(worker, None)
        else:
            index.remove_worker(worker)
            model.pop(worker, None)
        for query in queries:
            assert index.match(query) == _model_match(model, query)

    live = {w: {h for h, _ in copies} for w, copies in model.items() if copies}
    assert sorted(index.workers()) == sorted(live)
    assert index.num_blocks() == len(set().union(*live.values()) if live else set())
    for worker, held in live.items():
        assert index.num_blocks(worker) == len(held)


def test_the_benchmark_routes_a_trace_through_the_real_index_and_policy():
    trace = [[1, 2, 3], [1, 2, 3], [1, 2, 4], [9]]
    # no balance check: one worker has done all the work when the third request comes
    weights = PolicyWeights(load_cost=0, balance_threshold=0)
    result = run_benchmark(trace, num_workers=2, blocks_per_worker=10, weights=weights)
    # the repeats follow the cached prefix: 3 + 2 of 10 prompt blocks were cached
    assert result.hit_rate == 0.5
    assert result.num_requests == 4 and result.decisions_per_s > 0 and result.events_per_s > 0


def test_the_benchmark_evicts_beyond_each_workers_capacity():
    trace = synthetic_trace(num_requests=200, num_prefixes=5, seed=1)
    roomy = run_benchmark(trace, num_workers=2, blocks_per_worker=10_000)
    cramped = run_benchmark(trace, num_workers=2, blocks_per_worker=20)
    assert 0 < cramped.hit_rate < roomy.hit_rate
