"""Routing: each scorer on its own, the picker's tie rules, the whole policy (cache
affinity that yields to overload), the load view of a worker, conditional
disaggregation, and a router that never loads torch."""

from __future__ import annotations

import pytest

from common.kv_events import BlockStored
from common.protocol import LoadReport, WorkerRole
from router.policy import (
    DEFAULT_LOCAL_PREFILL_THRESHOLD,
    KVUsageScorer,
    LoadCostScorer,
    MaxScorePicker,
    NoWorkerAvailable,
    PolicyWeights,
    PrefixOverlapScorer,
    QueuedPrefillScorer,
    RequestView,
    RoutingPolicy,
    RunningRequestsScorer,
    lower_is_better,
    should_prefill_locally,
)
from router.prefix_index import PrefixIndex
from router.worker_state import REPORT_LAG_S, WorkerState
from tests.harness.torch_free import assert_imports_without_torch

BLOCK = 16


def _worker(worker_id: str, **load) -> WorkerState:
    worker = WorkerState(worker_id, WorkerRole.DECODE, f"tcp://127.0.0.1:{9000 + len(worker_id)}")
    if load:
        worker.update_load(LoadReport(**load))
    return worker


def _hold(index: PrefixIndex, worker_id: str, hashes: list[int]) -> None:
    index.apply_event(
        worker_id,
        BlockStored(
            block_hashes=hashes, parent_block_hash=None, token_ids=[0] * len(hashes) * BLOCK, block_size=BLOCK
        ),
    )


def _view(num_prompt_tokens: int, overlap: dict[str, int]) -> RequestView:
    return RequestView(num_prompt_tokens, num_prompt_tokens // BLOCK, BLOCK, dict(overlap))


# -- scorers, one at a time -------------------------------------------------------------


def test_lower_is_better_keeps_small_differences_small():
    assert lower_is_better([0, 0, 0]) == [1.0, 1.0, 1.0]
    assert lower_is_better([0, 50, 100]) == [1.0, 0.5, 0.0]
    close = lower_is_better([100, 101])
    assert close[0] - close[1] < 0.02


def test_prefix_overlap_rates_the_share_of_prompt_blocks_held():
    workers = [_worker("a"), _worker("b"), _worker("c")]
    ratings = PrefixOverlapScorer().score(_view(10 * BLOCK, {"a": 10, "b": 4}), workers)
    assert ratings == [1.0, 0.4, 0.0]
    assert PrefixOverlapScorer().score(_view(BLOCK - 1, {}), workers) == [0.0, 0.0, 0.0]


def test_queued_prefill_prefers_the_shorter_prefill_queue():
    workers = [_worker("a", num_queued_prefill_tokens=4000), _worker("b", num_queued_prefill_tokens=1000)]
    assert QueuedPrefillScorer().score(_view(BLOCK, {}), workers) == [0.0, 0.75]


def test_running_requests_prefers_the_smaller_batch():
    workers = [_worker("a", num_running=8, num_waiting=2), _worker("b", num_running=5), _worker("c")]
    assert RunningRequestsScorer().score(_view(BLOCK, {}), workers) == [0.0, 0.5, 1.0]


def test_kv_usage_prefers_the_emptier_cache():
    workers = [_worker("a", kv_cache_usage=0.9), _worker("b", kv_cache_usage=0.25), _worker("c")]
    assert KVUsageScorer().score(_view(BLOCK, {}), workers) == pytest.approx([0.1, 0.75, 1.0])


def test_load_cost_credits_cached_blocks_against_queued_prefill_and_held_blocks():
    scorer = LoadCostScorer(prefill_load_scale=2.0)
    busy_cached = _worker("a", num_queued_prefill_tokens=5 * BLOCK, kv_cache_usage=0.5, num_kv_blocks=20)
    idle_cold = _worker("b")
    view = _view(8 * BLOCK, {"a": 6})
    # a: 2 * max(5 queued + 8 prompt - 6 cached, 0) + 10 held = 24;  b: 2 * 8 = 16
    assert scorer.cost(view, busy_cached) == 24
    assert scorer.cost(view, idle_cold) == 16
    assert scorer.score(view, [busy_cached, idle_cold]) == [0.0, pytest.approx(1 - 16 / 24)]


def test_load_cost_counts_a_partial_block_of_prompt_or_queue_as_a_block():
    scorer = LoadCostScorer()
    view = RequestView(num_prompt_tokens=BLOCK + 1, num_prompt_blocks=1, block_size=BLOCK)
    assert scorer.cost(view, _worker("a", num_queued_prefill_tokens=1)) == 3


# -- the picker ---------------------------------------------------------------------------


def test_the_picker_takes_the_highest_score():
    workers = [_worker("a"), _worker("b"), _worker("c")]
    assert MaxScorePicker().pick(workers, [0.2, 0.9, 0.5]).worker_id == "b"


def test_ties_go_to_the_least_loaded():
    workers = [
        _worker("a", num_queued_prefill_tokens=100),
        _worker("b", num_queued_prefill_tokens=10, num_running=4),
        _worker("c", num_queued_prefill_tokens=10, num_running=1),
    ]
    picker = MaxScorePicker()
    assert {picker.pick(workers, [1.0, 1.0, 1.0]).worker_id for _ in range(5)} == {"c"}


def test_ties_among_equally_loaded_workers_rotate_in_id_order():
    workers = [_worker("c"), _worker("a"), _worker("b")]
    picker = MaxScorePicker()
    assert [picker.pick(workers, [0.5, 0.5, 0.5]).worker_id for _ in range(6)] == ["a", "b", "c"] * 2


def test_without_the_load_tie_break_ties_simply_rotate():
    workers = [_worker("a", num_running=9), _worker("b")]
    picker = MaxScorePicker(prefer_least_loaded=False)
    assert [picker.pick(workers, [0.0, 0.0]).worker_id for _ in range(4)] == ["a", "b", "a", "b"]


# -- the whole policy ------------------------------------------------------------------


def test_a_worker_holding_a_long_prefix_wins():
    index = PrefixIndex()
    _hold(index, "b", list(range(20)))
    _hold(index, "c", list(range(3)))
    workers = [_worker("a"), _worker("b"), _worker("c")]
    policy = RoutingPolicy(index, block_size=BLOCK)
    prompt_hashes = list(range(24))
    worker, decision = policy.choose(workers, prompt_hashes, 24 * BLOCK + 5)
    assert worker.worker_id == "b"
    assert decision.worker is worker
    assert decision.num_prompt_blocks == 24
    assert decision.overlap_blocks == 20 and decision.overlap_tokens == 20 * BLOCK
    assert decision.new_prefill_tokens == 4 * BLOCK + 5
    assert set(decision.scores) == {"a", "b", "c"}
    assert (
        decision.scores["b"]["total"] == decision.score == max(s["total"] for s in decision.scores.values())
    )
    assert set(decision.scores["a"]) == {"prefix_overlap", "estimated_ttft", "total"}


def test_a_worker_holding_the_prefix_loses_when_it_is_overloaded():
    index = PrefixIndex()
    _hold(index, "b", list(range(20)))
    idle = _worker("a")
    cached_but_swamped = _worker("b", num_queued_prefill_tokens=400 * BLOCK, num_running=40)
    policy = RoutingPolicy(index, block_size=BLOCK)
    worker, decision = policy.choose([idle, cached_but_swamped], list(range(24)), 24 * BLOCK)
    assert worker.worker_id == "a" and decision.overlap_blocks == 0


def test_the_requests_sent_since_the_last_report_spread_a_burst():
    policy = RoutingPolicy(PrefixIndex(), block_size=BLOCK)
    workers = [_worker("a"), _worker("b"), _worker("c")]
    chosen = []
    for n in range(6):
        worker, decision = policy.choose(workers, [100 + n], 4 * BLOCK)
        worker.note_request_sent(f"r{n}", decision.new_prefill_tokens, decision.num_prompt_blocks)
        chosen.append(worker.worker_id)
    assert sorted(chosen) == ["a", "a", "b", "b", "c", "c"]


def test_unhealthy_workers_are_never_chosen():
    index = PrefixIndex()
    _hold(index, "b", list(range(10)))
    down = _worker("b")
    down.healthy = False
    worker, _ = RoutingPolicy(index, block_size=BLOCK).choose(
        [_worker("a"), down], list(range(10)), 10 * BLOCK
    )
    assert worker.worker_id == "a"
    with pytest.raises(NoWorkerAvailable, match="none of the 1 candidate workers is healthy"):
        RoutingPolicy(index, block_size=BLOCK).choose([down], [1], BLOCK)


def test_weights_pick_the_scorers_and_zero_leaves_one_out():
    policy = RoutingPolicy(
        None, BLOCK, PolicyWeights(prefix_overlap=2, estimated_ttft=0, kv_usage=1, queued_prefill=1)
    )
    assert [(s.name, w) for s, w in policy.scorers] == [
        ("prefix_overlap", 2),
        ("queued_prefill", 1),
        ("kv_usage", 1),
        ("lora_affinity", 1.0),  # rates only requests under an adapter
    ]
    with pytest.raises(ValueError, match="weight of scorer running_requests"):
        RoutingPolicy(None, BLOCK, PolicyWeights(running_requests=-1))


def test_a_policy_of_one_load_scorer_is_least_loaded_routing():
    index = PrefixIndex()
    _hold(index, "a", list(range(10)))
    policy = RoutingPolicy(index, BLOCK, scorers=[(RunningRequestsScorer(), 1.0)])
    worker, _ = policy.choose(
        [_worker("a", num_running=3), _worker("b", num_running=1)], list(range(10)), 160
    )
    assert worker.worker_id == "b"


# -- the router's view of a worker's load ----------------------------------------------------


def test_requests_sent_count_until_the_next_load_report():
    worker = _worker("a", num_queued_prefill_tokens=100, num_running=2, kv_cache_usage=0.5, num_kv_blocks=100)
    now = [0.0]
    worker.clock = lambda: now[0]
    worker.note_request_sent("r1", prefill_tokens=300, kv_blocks=20)
    worker.note_request_sent("r2", prefill_tokens=50, kv_blocks=5)
    assert worker.queued_prefill_tokens == 450
    assert worker.num_active_requests == 4
    assert worker.active_kv_blocks == 75 and worker.kv_usage == 0.75

    worker.note_prefill_done("r1")
    assert worker.queued_prefill_tokens == 150 and worker.active_kv_blocks == 75
    worker.note_request_finished("r2")
    assert worker.queued_prefill_tokens == 100 and worker.num_active_requests == 3

    now[0] = REPORT_LAG_S  # a report arriving this long after r1 was sent counts it
    worker.update_load(LoadReport(num_queued_prefill_tokens=10, num_running=3))
    assert worker.queued_prefill_tokens == 10 and worker.num_active_requests == 3
    worker.note_request_finished("r1")  # already counted by the report: nothing to undo
    assert worker.num_active_requests == 3


def test_kv_usage_is_capped_at_full():
    worker = _worker("a", kv_cache_usage=0.9, num_kv_blocks=10)
    worker.note_request_sent("r", prefill_tokens=0, kv_blocks=50)
    assert worker.kv_usage == 1.0


def test_load_reports_are_checked_when_read_off_the_wire():
    report = LoadReport.from_dict({"num_running": 3, "kv_cache_usage": 1})
    assert report == LoadReport(num_running=3, kv_cache_usage=1.0)
    assert LoadReport.from_dict(report.to_dict()) == report
    with pytest.raises(ValueError, match="unknown fields"):
        LoadReport.from_dict({"num_runing": 3})
    with pytest.raises(ValueError, match="num_waiting must be a non-negative int"):
        LoadReport.from_dict({"num_waiting": -1})
    with pytest.raises(ValueError, match="kv_cache_usage must be a number from 0 to 1"):
        LoadReport.from_dict({"kv_cache_usage": 1.5})


# -- conditional disaggregation ---------------------------------------------------------------


def test_the_decode_worker_prefills_locally_when_little_of_the_prompt_is_missing():
    assert DEFAULT_LOCAL_PREFILL_THRESHOLD == 512
    assert should_prefill_locally(prompt_len=300, overlap_tokens_on_decode=0)
    assert should_prefill_locally(prompt_len=4000, overlap_tokens_on_decode=3600)
    assert not should_prefill_locally(prompt_len=4000, overlap_tokens_on_decode=3488)  # 512 missing
    assert should_prefill_locally(prompt_len=4000, overlap_tokens_on_decode=3489)
    assert not should_prefill_locally(prompt_len=10, overlap_tokens_on_decode=10, threshold=0)
    assert should_prefill_locally(prompt_len=10, overlap_tokens_on_decode=50, threshold=1)


def test_bad_disaggregation_inputs_are_refused():
    with pytest.raises(ValueError, match="threshold must be 0 or more"):
        should_prefill_locally(10, 0, threshold=-1)
    with pytest.raises(ValueError, match="must be 0 or more"):
        should_prefill_locally(-1, 0)


# -- the router stays torch-free -----------------------------------------------------------


def test_importing_the_routing_modules_leaves_torch_out():
    assert_imports_without_torch(
        "router.prefix_index", "router.kv_event_subscriber", "router.worker_state", "router.policy",
        "pdserve.bench.prefix_index", "common.kv_event_publisher",
    )  # fmt: skip
