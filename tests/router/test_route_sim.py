"""`pdserve bench route`'s simulation: an LRU block cache that publishes the KV events a
worker would, a worker whose engine steps follow the service-time model (chunked
prefill, prefix-cache hits, queues, decode batches), and a bounded replay of the
Mooncake trace through the router's real policy and prefix index."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from common.kv_events import BlockRemoved, BlockStored
from pdserve.bench.route_sim import ServiceModel, TraceReplay, load_trace, oracle_hit_rate, replay
from pdserve.bench.route_sim.block_cache import LRUBlockCache
from pdserve.bench.route_sim.sim_worker import Message, SimRequest, SimWorker
from pdserve.bench.trace import TraceRequest
from pdserve.cli.main import main as pdserve
from tests.harness.torch_free import assert_imports_without_torch

TRACE_HEAD = Path(__file__).parent / "data" / "mooncake_synthetic_trace_head400.jsonl"
# 1,000 tokens/s, 10 ms a step, no attention or KV-read cost: step times by hand
SIMPLE = ServiceModel(
    token_rate=1000.0,
    step_overhead_s=0.01,
    attention_crossover_tokens=0,
    kv_read_s_per_ktoken=0.0,
    max_num_batched_tokens=1000,
)


def _request(n: int, input_length: int, output_length: int, hash_ids, arrival_s: float = 0.0) -> SimRequest:
    return SimRequest(str(n), TraceRequest(arrival_s, input_length, output_length, tuple(hash_ids)))


def _run(cache: LRUBlockCache, hashes: list[int]) -> None:
    """One request through the cache: reuse its cached prefix, store the rest, finish."""
    hit = cache.cached_prefix(hashes)
    cache.use(hashes[:hit])
    cache.reserve(len(hashes) - hit)
    cache.store(hashes[hit:], hashes[hit - 1] if hit else None)
    cache.release(hashes)


# -- the block cache ------------------------------------------------------------------------


def test_the_cache_evicts_the_least_recently_used_block_tail_first_and_says_so():
    cache = LRUBlockCache(capacity=4, block_size=512)
    _run(cache, [1, 2])
    _run(cache, [3, 4])
    assert cache.take_events() == [
        BlockStored(block_hashes=[1, 2], parent_block_hash=None, token_ids=[], block_size=512, medium="GPU"),
        BlockStored(block_hashes=[3, 4], parent_block_hash=None, token_ids=[], block_size=512, medium="GPU"),
    ]
    _run(cache, [1, 5])  # reuses block 1; block 5 needs room: 2 (the tail of [1, 2]) goes
    assert cache.take_events() == [
        BlockRemoved(block_hashes=[2], medium="GPU"),
        BlockStored(block_hashes=[5], parent_block_hash=1, token_ids=[], block_size=512, medium="GPU"),
    ]
    assert cache.blocks() == {1, 3, 4, 5} and cache.num_evicted == 1


def test_blocks_in_use_are_never_evicted_and_a_prompt_waits_for_room():
    cache = LRUBlockCache(capacity=3, block_size=512)
    cache.reserve(2)
    cache.store([1, 2], None)  # a running request holds 1 and 2
    assert cache.can_reserve(1) and not cache.can_reserve(2)
    with pytest.raises(ValueError, match="cannot reserve 2 blocks: 2 of 3 are in use"):
        cache.reserve(2)
    cache.release([1, 2])
    assert cache.can_reserve(3)
    cache.reserve(3)
    cache.store([7, 8, 9], None)
    assert cache.blocks() == {7, 8, 9} and cache.peak_blocks == 3


def test_a_block_another_request_stored_meanwhile_is_shared_not_stored_twice():
    cache = LRUBlockCache(capacity=8, block_size=512)
    cache.reserve(2)
    cache.reserve(2)
    cache.store([1, 2], None)
    cache.store([1, 2], None)
    assert len(cache) == 2 and cache.num_in_use == 2
    assert [type(e) for e in cache.take_events()] == [BlockStored]
    cache.release([1, 2])
    assert cache.num_in_use == 2  # the other request still holds them
    cache.release([1, 2])
    assert cache.num_in_use == 0 and len(cache) == 2


# -- one simulated worker ---------------------------------------------------------------------


def test_a_lone_prompt_is_prefilled_in_chunks_of_the_step_budget_then_decoded():
    worker = SimWorker("w", capacity_blocks=100, model=SIMPLE)
    r = _request(0, 2500, 3, range(5))
    worker.submit(r, 0.0)
    worker.advance(math.inf)
    # chunks of 1000, 1000, 500 tokens: 1.01 + 1.01 + 0.51 s; then 2 decode steps of 0.011 s
    assert r.ttft_s == pytest.approx(2.53)
    assert r.finish_s == pytest.approx(2.552)
    assert worker.prefill_tokens == 2500 and worker.cached_tokens == 0
    assert [kind for _, kind, _ in worker.outbox if kind is not Message.LOAD_REPORT] == [
        Message.KV_EVENTS,
        Message.KV_EVENTS,
        Message.KV_EVENTS,
        Message.FIRST_TOKEN,
        Message.FINISHED,
    ]


def test_a_repeated_prompt_computes_only_its_last_token():
    worker = SimWorker("w", capacity_blocks=100, model=SIMPLE)
    worker.submit(_request(0, 2500, 1, range(5)), 0.0)
    worker.advance(math.inf)
    again = _request(1, 2500, 1, range(5), arrival_s=10.0)
    worker.submit(again, 10.0)
    worker.advance(math.inf)
    assert again.cached_tokens == 2499
    assert again.ttft_s == pytest.approx(0.011)
    assert worker.cached_tokens == 2499 and worker.prefill_tokens == 2501


def test_a_short_prompt_behind_a_long_prefill_waits_for_it():
    worker = SimWorker("w", capacity_blocks=100, model=SIMPLE)
    long = _request(0, 5000, 1, range(10))
    short = _request(1, 100, 1, [99], arrival_s=0.5)
    worker.submit(long, 0.0)
    worker.advance(0.5)
    worker.submit(short, 0.5)
    worker.advance(math.inf)
    # the long prompt's chunks fill five steps (5.05 s); the short one gets the sixth
    assert long.ttft_s == pytest.approx(5.05)
    assert short.ttft_s == pytest.approx(5.05 + 0.11 - 0.5)


def test_decoding_in_a_batch_is_slower_per_step_but_faster_than_one_by_one():
    def decode_time(batch: int) -> float:
        worker = SimWorker("w", capacity_blocks=100, model=SIMPLE)
        requests = [_request(n, 1, 101, [n]) for n in range(batch)]
        for r in requests:
            worker.submit(r, 0.0)
        worker.advance(math.inf)
        return max(r.finish_s for r in requests) - max(r.first_token_s for r in requests)

    alone, eight = decode_time(1), decode_time(8)
    assert alone == pytest.approx(100 * 0.011)
    # the first prompt started alone on the idle worker and finishes a step before the
    # other seven: 99 steps of 8 tokens, then one of 7
    assert eight == pytest.approx(99 * 0.018 + 0.017)
    assert alone < eight < 8 * alone


def test_the_worker_reports_its_queue_as_the_engine_counts_it():
    worker = SimWorker("w", capacity_blocks=100, model=SIMPLE)
    worker.submit(_request(0, 5000, 1, range(10)), 0.0)
    worker.advance(0.5)
    worker.submit(_request(1, 100, 1, [99], arrival_s=0.5), 0.5)
    worker.outbox.clear()
    worker.advance(1.5)  # the step ending at 1.01 s
    reports = [payload for _, kind, payload in worker.outbox if kind is Message.LOAD_REPORT]
    assert len(reports) == 1
    # a waiting prompt counts whole; the running one what it has left after its first chunk
    assert reports[0].num_waiting == 1 and reports[0].num_running == 1
    assert reports[0].num_queued_prefill_tokens == 4000 + 100
    assert reports[0].kv_cache_usage == pytest.approx(10 / 100)


def test_attention_makes_a_long_prompt_cost_more_than_its_length():
    def ttft(tokens: int) -> float:
        worker = SimWorker("w", capacity_blocks=1000)  # default model: attention counts
        r = _request(0, tokens, 1, range(-(-tokens // 512)))
        worker.submit(r, 0.0)
        worker.advance(math.inf)
        return r.ttft_s

    assert ttft(40_000) > 2.4 * ttft(20_000)
    assert ttft(20_000) > 2.2 * ttft(10_000)


def test_a_prompt_larger_than_a_worker_is_refused_with_the_flag_to_raise():
    worker = SimWorker("w", capacity_blocks=4, model=SIMPLE)
    with pytest.raises(ValueError, match="needs 5 KV blocks.*raise --blocks-per-worker to at least 5"):
        worker.submit(_request(0, 2500, 1, range(5)), 0.0)


# -- the trace and the oracle -----------------------------------------------------------------


def test_the_oracle_counts_the_leading_blocks_seen_before_less_the_last_token():
    trace = [
        TraceRequest(0.0, 1024, 1, (1, 2)),
        TraceRequest(1.0, 1500, 1, (1, 2, 3)),  # 2 blocks seen
        TraceRequest(2.0, 1024, 1, (1, 2)),  # all seen: 1023 tokens
        TraceRequest(3.0, 600, 1, (9, 2)),  # block 2 alone does not count
    ]
    assert oracle_hit_rate(trace) == pytest.approx((1024 + 1023) / (1024 + 1500 + 1024 + 600))


def test_a_malformed_trace_line_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "trace.jsonl"
    path.write_text(
        '{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [1]}\n{"timestamp": 5}\n'
    )
    with pytest.raises(
        ValueError, match=r"trace.jsonl:2: missing \['input_length', 'output_length', 'hash_ids'\]"
    ):
        load_trace(str(path))
    assert len(load_trace(str(path), limit=1)) == 1


# -- replaying the head of the Mooncake trace -----------------------------------------------


@pytest.fixture(scope="module")
def trace():
    return load_trace(str(TRACE_HEAD))


@pytest.fixture(scope="module")
def replays(trace):
    done = {}
    for name in ("round_robin", "least_loaded", "longest_prefix", "prefix"):
        run = TraceReplay(trace, name, num_workers=8)
        done[name] = (run, run.run())
    return done


def test_the_prefix_policy_finds_the_cache_round_robin_misses(replays):
    prefix = replays["prefix"][1]
    round_robin = replays["round_robin"][1]
    assert prefix.hit_rate > 2 * round_robin.hit_rate
    assert prefix.ttft_p99_ms < round_robin.ttft_p99_ms
    assert prefix.load_imbalance < round_robin.load_imbalance


def test_no_policy_beats_the_oracle(replays, trace):
    oracle = oracle_hit_rate(trace)
    for _, result in replays.values():
        assert 0 <= result.hit_rate <= oracle
        assert result.oracle_hit_rate == pytest.approx(oracle)


def test_the_routers_index_holds_exactly_what_each_simulated_worker_caches(replays):
    for run, result in replays.values():
        assert result.evicted_blocks > 0 and result.kv_events > 0
        for worker_id, worker in run.workers.items():
            held = worker.cache.blocks()
            assert run.index.num_blocks(worker_id) == len(held)
            assert all(run.index.holds(worker_id, h) for h in held)


def test_no_worker_ever_caches_more_blocks_than_its_capacity(replays):
    for run, result in replays.values():
        assert result.blocks_per_worker == run.capacity
        for worker in run.workers.values():
            assert 0 < worker.cache.peak_blocks <= run.capacity
            assert worker.cache.num_in_use == 0  # everything finished and let go


def test_every_request_is_answered_after_it_arrives(replays, trace):
    for run, result in replays.values():
        assert result.num_requests == len(trace) == len(run.requests)
        for r in run.requests:
            assert r.trace.arrival_s < r.first_token_s <= r.finish_s
        assert sum(w.prompt_tokens for w in run.workers.values()) == sum(r.input_length for r in trace)
        assert result.ttft_p50_ms <= result.ttft_p99_ms


def test_round_robin_sends_each_worker_the_same_number_of_requests(replays):
    run, _ = replays["round_robin"]
    counts = [worker.num_requests for worker in run.workers.values()]
    assert sum(counts) == len(run.requests) and max(counts) - min(counts) <= 1


def test_a_replay_repeats_exactly(trace):
    first = replay(trace[:150], "prefix", num_workers=4)
    second = replay(trace[:150], "prefix", num_workers=4)
    assert first.prefill_tokens_per_worker == second.prefill_tokens_per_worker
    assert first.ttft_p99_ms == second.ttft_p99_ms


# -- the command ------------------------------------------------------------------------------


def test_the_replay_and_its_command_leave_torch_out():
    assert_imports_without_torch("pdserve.bench.route_sim", "pdserve.bench.route_sim.command")


def test_bench_route_reports_every_policy_as_json(tmp_path, capsys):
    out = tmp_path / "route.json"
    status = pdserve(
        [
            "bench",
            "route",
            "--trace",
            str(TRACE_HEAD),
            "--max-requests",
            "120",
            "--num-workers",
            "4",
            "--output-json",
            str(out),
        ]  # fmt: skip
    )
    assert status == 0
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report
    assert report["num_requests"] == 120 and report["num_workers"] == 4
    assert set(report["policies"]) == {"round_robin", "least_loaded", "longest_prefix", "prefix"}
    for result in report["policies"].values():
        for key in ("hit_rate", "oracle_hit_rate", "load_imbalance", "ttft_p50_ms", "ttft_p99_ms",
                    "decisions_per_s", "kv_events_per_s"):  # fmt: skip
            assert isinstance(result[key], float), key
        assert result["oracle_hit_rate"] == report["oracle_hit_rate"]


def test_bench_route_says_which_trace_it_cannot_read(tmp_path, capsys):
    status = pdserve(["bench", "route", "--trace", str(tmp_path / "missing.jsonl")])
    assert status == 1
    assert "cannot read --trace" in capsys.readouterr().err
