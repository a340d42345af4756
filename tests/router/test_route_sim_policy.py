"""The routing pieces `pdserve bench route` tuned: the named policies it compares, the
load cost's price of a cache miss, the picker's tie-break by recently routed work, and
the weights read from --routing-weights."""

from __future__ import annotations

import pytest

from common.kv_events import BlockStored
from common.protocol import LoadReport, WorkerRole
from router.policy import LoadCostScorer, MaxScorePicker, PolicyWeights, RequestView, RoutingPolicy
from router.policy.named import POLICY_NAMES, build_policy
from router.prefix_index import PrefixIndex
from router.worker_state import WorkerState
from tests.harness.manual_clock import ManualClock as Clock

BLOCK = 16


def _worker(worker_id: str, clock=None, **load) -> WorkerState:
    worker = WorkerState(worker_id, WorkerRole.DECODE, f"sim://{worker_id}", clock=clock or Clock())
    if load:
        worker.update_load(LoadReport(**load))
    return worker


def _index_holding(worker_id: str, hashes: list[int]) -> PrefixIndex:
    index = PrefixIndex()
    index.apply_event(
        worker_id,
        BlockStored(block_hashes=hashes, parent_block_hash=None, token_ids=[], block_size=BLOCK),
    )
    return index


# -- the named policies -------------------------------------------------------------------


def test_round_robin_ignores_cache_and_load():
    index = _index_holding("b", list(range(8)))
    workers = [_worker("a", num_queued_prefill_tokens=10_000), _worker("b"), _worker("c")]
    policy = build_policy("round_robin", index, BLOCK)
    chosen = [policy.choose(workers, list(range(8)), 8 * BLOCK)[0].worker_id for _ in range(6)]
    assert chosen == ["a", "b", "c", "a", "b", "c"]


def test_least_loaded_ignores_the_cache():
    index = _index_holding("b", list(range(8)))
    workers = [_worker("a"), _worker("b", num_queued_prefill_tokens=BLOCK)]
    worker, decision = build_policy("least_loaded", index, BLOCK).choose(workers, list(range(8)), 8 * BLOCK)
    assert worker.worker_id == "a" and decision.overlap_blocks == 0


def test_longest_prefix_follows_the_cache_however_long_the_queue():
    index = _index_holding("b", list(range(8)))
    workers = [_worker("a"), _worker("b", num_queued_prefill_tokens=1000 * BLOCK)]
    worker, _ = build_policy("longest_prefix", index, BLOCK).choose(workers, list(range(8)), 8 * BLOCK)
    assert worker.worker_id == "b"


def test_the_prefix_policy_leaves_the_cache_when_its_queue_costs_more_than_a_miss():
    index = _index_holding("b", list(range(8)))
    policy = build_policy("prefix", index, BLOCK)
    # b's queue is shorter than the price of 8 missing blocks: stay with the cache
    workers = [_worker("a"), _worker("b", num_queued_prefill_tokens=20 * BLOCK)]
    assert policy.choose(workers, list(range(8)), 8 * BLOCK)[0].worker_id == "b"
    # a queue longer than that: go to the idle worker and compute the prompt there
    workers = [_worker("a"), _worker("b", num_queued_prefill_tokens=200 * BLOCK)]
    assert policy.choose(workers, list(range(8)), 8 * BLOCK)[0].worker_id == "a"


def test_a_short_prompt_cached_on_a_busy_worker_goes_to_an_idle_one():
    index = _index_holding("b", [1])
    workers = [_worker("a"), _worker("b", num_queued_prefill_tokens=100 * BLOCK)]
    worker, _ = build_policy("prefix", index, BLOCK).choose(workers, [1], BLOCK + 3)
    assert worker.worker_id == "a"


def test_an_unknown_policy_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown routing policy 'fastest'; choose one of round_robin"):
        build_policy("fastest", PrefixIndex(), BLOCK)
    assert POLICY_NAMES == ("round_robin", "least_loaded", "longest_prefix", "prefix")


# -- the load cost's price of a miss --------------------------------------------------------


def test_a_missing_block_costs_cache_miss_scale_queued_blocks():
    scorer = LoadCostScorer(prefill_load_scale=2.0, cache_miss_scale=3.0)
    view = RequestView(8 * BLOCK, 8, BLOCK, {"a": 6})
    worker = _worker("a", num_queued_prefill_tokens=5 * BLOCK, kv_cache_usage=0.5, num_kv_blocks=20)
    # 2 * (5 queued + 3 * 2 missing) + 10 held
    assert scorer.cost(view, worker) == 32
    with pytest.raises(ValueError, match="cache_miss_scale must be 0 or more"):
        LoadCostScorer(cache_miss_scale=-1)


# -- the picker's tie-break ------------------------------------------------------------------


def test_equal_workers_take_turns_by_the_prefill_work_routed_to_them():
    clock = Clock()
    workers = [_worker(name, clock) for name in ("a", "b", "c")]
    picker = MaxScorePicker()
    picker.note_routed(workers[0], 50_000)
    picker.note_routed(workers[2], 10)
    assert picker.pick(workers, [1.0, 1.0, 1.0]).worker_id == "b"
    picker.note_routed(workers[1], 1_000)
    assert picker.pick(workers, [1.0, 1.0, 1.0]).worker_id == "c"


def test_routed_work_halves_every_half_life():
    clock = Clock()
    worker = _worker("a", clock)
    picker = MaxScorePicker(routed_work_half_life_s=60.0)
    picker.note_routed(worker, 8000)
    clock.now = 120.0
    assert picker.routed_work(worker) == pytest.approx(2000)
    picker.note_routed(worker, 1000)
    clock.now = 180.0
    assert picker.routed_work(worker) == pytest.approx(1500)


def test_the_policy_tells_the_picker_what_it_routed():
    index = _index_holding("a", list(range(4)))
    workers = [_worker("a"), _worker("b")]
    policy = RoutingPolicy(index, BLOCK)
    worker, decision = policy.choose(workers, list(range(6)), 6 * BLOCK)
    assert worker.worker_id == "a" and decision.new_prefill_tokens == 2 * BLOCK
    assert policy.picker.routed_work(workers[0]) == 2 * BLOCK
    assert policy.picker.routed_work(workers[1]) == 0


# -- weights from --routing-weights ---------------------------------------------------------


def test_weights_from_json_keep_the_defaults_they_do_not_name():
    weights = PolicyWeights.from_dict({"cache_miss_scale": 3, "kv_usage": 0.5})
    assert weights.cache_miss_scale == 3.0 and weights.kv_usage == 0.5
    assert weights.prefill_load_scale == PolicyWeights().prefill_load_scale
    with pytest.raises(ValueError, match=r"unknown weights \['prefix'\]"):
        PolicyWeights.from_dict({"prefix": 1})
    with pytest.raises(ValueError, match="load_cost must be a number, 0 or more; got -1"):
        PolicyWeights.from_dict({"load_cost": -1})
