"""What the router measures and the policy built on it: a load report's lag, a worker's
prefill speed from its reports, the estimated time to first token, and the balance
check that spreads a hot prefix."""

from __future__ import annotations

import pytest

from common.kv_events import BlockStored
from common.protocol import LoadReport, ProtocolError, WorkerRole
from common.worker.load_reports import load_of
from router.policy import EstimatedTTFTScorer, PolicyWeights, RequestView, RoutingPolicy
from router.prefix_index import PrefixIndex
from router.worker_state import REPORT_LAG_S, WorkerState
from tests.harness.manual_clock import ManualClock as Clock

BLOCK = 16


def _worker(worker_id: str, clock: Clock | None = None) -> WorkerState:
    return WorkerState(worker_id, WorkerRole.DECODE, f"sim://{worker_id}", clock=clock or Clock())


def test_a_request_sent_just_before_a_report_arrived_stays_counted():
    clock = Clock()
    worker = _worker("a", clock)
    worker.note_request_sent("old", prefill_tokens=100)
    clock.now = 1.0
    worker.note_request_sent("new", prefill_tokens=7)
    clock.now = 1.0 + REPORT_LAG_S / 2
    worker.update_load(LoadReport(num_queued_prefill_tokens=100, num_running=1))
    assert worker.queued_prefill_tokens == 107  # "old" is in the report, "new" not yet
    assert worker.num_active_requests == 2


def test_prefill_speed_is_measured_only_while_prompts_stay_queued():
    clock = Clock()
    worker = _worker("a", clock)
    worker.update_load(LoadReport(num_queued_prefill_tokens=5000, num_prompt_tokens_total=0))
    clock.now = 1.0
    worker.update_load(LoadReport(num_queued_prefill_tokens=3000, num_prompt_tokens_total=4000))
    assert worker.prefill_tokens_per_s == pytest.approx(4000)
    clock.now = 2.0  # the queue ran dry: 500 tokens in a second says nothing of the speed
    worker.update_load(LoadReport(num_queued_prefill_tokens=0, num_prompt_tokens_total=4500))
    assert worker.prefill_tokens_per_s == pytest.approx(4000)
    clock.now = 3.0  # idle from the start: nothing measured either
    worker.update_load(LoadReport(num_queued_prefill_tokens=900, num_prompt_tokens_total=4600))
    assert worker.prefill_tokens_per_s == pytest.approx(4000)
    clock.now = 4.0
    worker.update_load(LoadReport(num_queued_prefill_tokens=100, num_prompt_tokens_total=6600))
    assert 2000 < worker.prefill_tokens_per_s < 4000  # moves toward the new 2,000 tokens/s


def test_a_restarted_worker_is_not_measured_across_the_restart():
    clock = Clock()
    worker = _worker("a", clock)
    worker.update_load(
        LoadReport(engine_id="e1", num_queued_prefill_tokens=500, num_prompt_tokens_total=90_000)
    )
    clock.now = 1.0
    worker.update_load(
        LoadReport(engine_id="e2", num_queued_prefill_tokens=500, num_prompt_tokens_total=95_000)
    )
    assert worker.prefill_tokens_per_s is None


def test_the_prompt_token_counter_is_checked_and_filled_from_engine_stats():
    with pytest.raises(ProtocolError, match="num_prompt_tokens_total"):
        LoadReport.from_dict({"num_prompt_tokens_total": -1})

    class Stats:
        num_running = num_waiting = num_waiting_for_remote_kv = num_queued_prefill_tokens = 0
        kv_cache_usage = 0.0
        num_prompt_tokens = 1234

    assert load_of(Stats())["num_prompt_tokens_total"] == 1234


def _request(overlaps: dict[str, int], prompt_blocks: int) -> RequestView:
    return RequestView(prompt_blocks * BLOCK, prompt_blocks, BLOCK, overlaps)


def test_estimated_ttft_credits_the_cache_until_the_queue_costs_more():
    cached, idle = _worker("cached"), _worker("idle")
    request = _request({"cached": 10}, prompt_blocks=10)  # 160 tokens, all cached on "cached"
    scorer = EstimatedTTFTScorer(cache_miss_scale=2.0)
    cached.note_request_sent("q", prefill_tokens=300)  # queue 300 < 2 × 160 missing elsewhere
    assert scorer.seconds(request, [cached, idle]) == [300, 320]
    cached.note_request_sent("q2", prefill_tokens=100)
    assert scorer.score(request, [cached, idle]) == [0.0, pytest.approx(1 - 320 / 400)]


def test_estimated_ttft_divides_by_the_measured_speed_when_asked():
    clock = Clock()
    fast, slow, new = _worker("fast", clock), _worker("slow", clock), _worker("new", clock)
    for worker in (fast, slow):
        worker.update_load(LoadReport(num_queued_prefill_tokens=10_000, num_prompt_tokens_total=0))
    clock.now = 1.0
    for worker, rate in ((fast, 4000), (slow, 1000)):
        worker.update_load(LoadReport(num_queued_prefill_tokens=100, num_prompt_tokens_total=rate))
    request = _request({}, prompt_blocks=25)  # 400 tokens
    seconds = EstimatedTTFTScorer(use_measured_speed=True).seconds(request, [fast, slow, new])
    assert seconds == pytest.approx([500 / 4000, 500 / 1000, 400 / 2500])  # "new" at the mean speed
    assert EstimatedTTFTScorer().seconds(request, [fast, slow, new]) == [500, 500, 400]


def _index_holding(worker_id: str, hashes: list[int]) -> PrefixIndex:
    index = PrefixIndex()
    index.apply_event(
        worker_id, BlockStored(block_hashes=hashes, parent_block_hash=None, token_ids=[], block_size=BLOCK)
    )
    return index


def test_a_worker_sent_far_more_work_lately_is_left_out_even_holding_the_prefix():
    index = _index_holding("hot", list(range(8)))
    workers = [_worker("hot"), _worker("b"), _worker("c")]
    policy = RoutingPolicy(index, BLOCK)
    policy.picker.note_routed(workers[0], 10_000)
    chosen, _ = policy.choose(workers, list(range(8)), 8 * BLOCK)
    assert chosen.worker_id != "hot"
    unchecked = RoutingPolicy(index, BLOCK, PolicyWeights(balance_threshold=0))
    unchecked.picker.note_routed(workers[0], 10_000)
    assert unchecked.choose(workers, list(range(8)), 8 * BLOCK)[0].worker_id == "hot"


def test_within_the_balance_margin_the_prefix_holder_keeps_its_requests():
    index = _index_holding("hot", list(range(8)))
    workers = [_worker("hot"), _worker("b"), _worker("c")]
    policy = RoutingPolicy(index, BLOCK)
    # ahead of the mean (966) by less than the 5 % margin, this fully cached prompt included
    for worker, tokens in zip(workers, (1000, 950, 950), strict=True):
        policy.picker.note_routed(worker, tokens)
    assert policy.choose(workers, list(range(8)), 8 * BLOCK)[0].worker_id == "hot"
