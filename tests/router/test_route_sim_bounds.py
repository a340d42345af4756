"""The least load imbalance a trace allows, the held-out workloads' shapes, and the
route bench's workload list and floor column."""

from __future__ import annotations

import json

import pytest

from pdserve.bench.route_sim import TraceReplay
from pdserve.bench.route_sim.bounds import imbalance_floor, lpt_imbalance, oracle_misses
from pdserve.bench.route_sim.goal import BASELINES, goal_row
from pdserve.bench.route_sim.trace_replay import oracle_hit_rate
from pdserve.bench.route_sim.workloads import TUNING_WORKLOADS, WORKLOADS, conversation, mixed, rag
from pdserve.bench.trace import TRACE_BLOCK_SIZE, TraceRequest
from pdserve.cli.main import main as pdserve

B = TRACE_BLOCK_SIZE


def _req(t: float, blocks: tuple[int, ...]) -> TraceRequest:
    return TraceRequest(t, len(blocks) * B, 1, blocks)


def test_oracle_misses_count_what_no_earlier_prompt_held():
    trace = [_req(0, (1, 2)), _req(1, (1, 2, 3)), _req(2, (4,))]
    assert oracle_misses(trace) == [2 * B, B, B]


def test_one_request_larger_than_a_workers_share_sets_the_floor():
    trace = [_req(0, tuple(range(100)))] + [_req(1 + i, (1000 + i,)) for i in range(20)]
    # 120 blocks of work at best, 4 workers: a mean of 30 blocks, one request of 100
    assert imbalance_floor(trace, 4, oracle_hit_rate(trace)) == pytest.approx(100 * 4 / 120)
    assert lpt_imbalance(trace, 4) == pytest.approx(100 * 4 / 120)
    assert imbalance_floor(trace, 1, oracle_hit_rate(trace)) == 1.0


def test_lpt_spreads_equal_work_evenly_and_the_floor_allows_it():
    trace = [_req(i, (i,)) for i in range(8)]
    assert lpt_imbalance(trace, 4) == 1.0 and imbalance_floor(trace, 4, oracle_hit_rate(trace)) == 1.0
    assert lpt_imbalance(trace, 3) == pytest.approx(3 * 3 / 8)  # 8 items on 3: 3, 3, 2


def test_no_replay_spreads_work_more_evenly_than_the_floor():
    trace = conversation(seed=2, duration_s=60)
    oracle = oracle_hit_rate(trace)
    for policy in ("round_robin", "prefix"):
        result = TraceReplay(trace, policy, num_workers=4).run(oracle)
        if result.hit_rate >= 0.96 * oracle:
            assert result.load_imbalance >= imbalance_floor(trace, 4, oracle) - 1e-9


def test_rag_prompts_are_a_system_prompt_then_popular_documents_then_a_question():
    trace = rag(seed=0, duration_s=300)
    firsts = {r.hash_ids[0] for r in trace}
    assert len(firsts) <= 4  # four system prompts of at least 800 tokens: one first block each
    heads = [r.hash_ids[:6] for r in trace if len(r.hash_ids) > 8]
    repeated = len(heads) - len(set(heads))
    assert repeated > len(heads) / 4  # popular first documents are shared beyond the system prompt
    assert oracle_hit_rate(trace) < oracle_hit_rate(conversation(seed=0, duration_s=300))


def test_mixed_interleaves_every_shape_with_block_ids_kept_apart():
    trace = mixed(seed=0, duration_s=200)
    sources = {h >> 40 for r in trace for h in r.hash_ids}
    assert sources == {0, 1, 2, 3}
    assert all(len({h >> 40 for h in r.hash_ids}) == 1 for r in trace)  # one source per prompt
    assert [r.arrival_s for r in trace] == sorted(r.arrival_s for r in trace)


def test_the_held_out_workloads_are_not_among_the_tuning_ones():
    assert set(TUNING_WORKLOADS) < set(WORKLOADS) and {"rag", "mixed"} <= set(WORKLOADS) - set(
        TUNING_WORKLOADS
    )


def test_bench_route_reports_the_floor_and_takes_one_workload_outside_the_suite(tmp_path, capsys):
    out = tmp_path / "route.json"
    args = ["bench", "route", "--workload", "rag", "--max-requests", "60", "--num-workers", "2",
            "--policy", "prefix", "--output-json", str(out)]  # fmt: skip
    assert pdserve(args) == 0
    report = json.loads(out.read_text())
    assert report["imbalance_floor"] >= 1.0 and report["lpt_imbalance"] >= 1.0
    assert "imb. floor" in capsys.readouterr().err
    assert pdserve(["bench", "route", "--workload", "rag,agent"]) == 1
    assert "a list is for --suite" in capsys.readouterr().err


def test_an_unknown_workload_in_a_list_is_named(capsys):
    assert pdserve(["bench", "route", "--suite", "--workload", "agent,chat"]) != 0
    assert "unknown workload chat" in capsys.readouterr().err


def _run(prefix: dict, **others: dict) -> dict:
    base = {"hit_rate": 0.5, "load_imbalance": 1.0, "ttft_p50_ms": 100.0, "ttft_p99_ms": 1000.0,
            "ttft_p999_ms": 2000.0, "ttft_mean_ms": 200.0}  # fmt: skip
    policies = {name: {**base, **others.get(name, {})} for name in BASELINES}
    return {
        "oracle_hit_rate": 0.5,
        "imbalance_floor": 1.0,
        "policies": {**policies, "prefix": {**base, **prefix}},
    }


def test_the_goal_names_each_part_missed():
    assert goal_row(_run({}))["goal"] == "met"  # equal to the best is at or below it
    row = goal_row(_run({"hit_rate": 0.47, "load_imbalance": 1.06, "ttft_p99_ms": 999.0},
                        longest_prefix={"ttft_p99_ms": 900.0}))  # fmt: skip
    assert row["goal"] == "missed: hit, imbalance, p99" and row["best_ttft_p99_ms"] == 900.0
    assert goal_row({"oracle_hit_rate": 0.5, "policies": {"prefix": {}}}) is None
