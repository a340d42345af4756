"""`pdserve bench route`'s synthetic workloads, the event delay and the suite: each
workload has its shape, repeats by seed, and replays; delayed events reach the router
late; the suite covers every setting."""

from __future__ import annotations

import json

import pytest

from pdserve.bench.route_sim import TraceReplay
from pdserve.bench.route_sim.sim_worker import SimRequest
from pdserve.bench.route_sim.suite import settings
from pdserve.bench.route_sim.workloads import WORKLOADS, agent, bursty, conversation, generate
from pdserve.bench.trace import TRACE_BLOCK_SIZE
from pdserve.cli.main import main as pdserve


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_a_workload_repeats_by_seed_and_fits_the_trace_format(name):
    trace = generate(name, seed=3)
    assert trace == generate(name, seed=3) and trace != generate(name, seed=4)
    assert [r.arrival_s for r in trace] == sorted(r.arrival_s for r in trace)
    for r in trace:
        assert len(r.hash_ids) == -(-r.input_length // TRACE_BLOCK_SIZE) and r.output_length >= 1


def test_a_conversation_turn_extends_the_previous_turns_prompt():
    trace = conversation(seed=0, duration_s=60)
    extended = 0
    for i, later in enumerate(trace):
        for earlier in trace[:i]:
            full = earlier.input_length // TRACE_BLOCK_SIZE
            if (
                full
                and later.hash_ids[:full] == earlier.hash_ids[:full]
                and later.input_length > earlier.input_length + 512
            ):
                extended += 1
                break
    assert extended > len(trace) / 2


def test_agent_steps_share_a_long_tool_prompt():
    trace = agent(seed=0, duration_s=60)
    heads = [r.hash_ids[:16] for r in trace]  # 8k tokens: every tool prompt is at least that long
    assert len(set(heads)) < len(trace) / 4


def test_bursty_arrivals_come_in_bursts():
    trace = bursty(seed=0, duration_s=600)
    gaps = sorted(b.arrival_s - a.arrival_s for a, b in zip(trace, trace[1:], strict=False))
    median, p99 = gaps[len(gaps) // 2], gaps[int(len(gaps) * 0.99)]
    assert p99 > 15 * median  # a Poisson process of one rate has p99 / median of about 6.6


def test_an_unknown_workload_lists_the_known_ones():
    with pytest.raises(ValueError, match="conversation, agent, bursty"):
        generate("chat")


def test_delayed_events_reach_the_router_late_but_all_arrive():
    trace = conversation(seed=1, duration_s=40)
    prompt = max(trace, key=lambda r: r.input_length)
    run = TraceReplay(trace, "prefix", num_workers=2, event_delay_s=10.0)
    result = run.run()
    for worker_id, worker in run.workers.items():  # every event delivered by the end
        assert run.index.num_blocks(worker_id) == len(worker.cache.blocks())
    assert result.ttft_p50_ms <= result.ttft_p99_ms <= result.ttft_p999_ms
    prompt_run = TraceReplay([prompt], "prefix", num_workers=1, event_delay_s=10.0)
    prompt_run.now = prompt.arrival_s
    worker = prompt_run.workers["w0"]
    worker.submit(SimRequest("0", prompt), prompt.arrival_s)
    first_token = prompt.arrival_s + 5.0
    prompt_run._catch_up(first_token)
    assert worker.cache.blocks() and prompt_run.index.num_blocks("w0") == 0  # stored, not heard yet
    prompt_run._catch_up(first_token + 10.0)
    assert prompt_run.index.num_blocks("w0") == len(worker.cache.blocks())


def test_the_sweep_covers_workers_capacity_and_load_both_ways():
    assert [s[1:] for s in settings(8)] == [
        (8, 1.0, 1.0), (4, 1.0, 1.0), (16, 1.0, 1.0), (8, 0.5, 1.0), (8, 2.0, 1.0), (8, 1.0, 1.25), (8, 1.0, 0.8),
    ]  # fmt: skip


def test_bench_route_replays_a_workload_with_the_tail_columns(tmp_path, capsys):
    out = tmp_path / "route.json"
    args = ["bench", "route", "--workload", "bursty", "--max-requests", "80", "--num-workers", "2",
            "--event-delay-ms", "30", "--output-json", str(out)]  # fmt: skip
    assert pdserve(args) == 0
    report = json.loads(out.read_text())
    assert report["event_delay_ms"] == 30 and report["num_requests"] == 80
    for result in report["policies"].values():
        assert result["ttft_p99_ms"] <= result["ttft_p999_ms"] and result["ttft_mean_ms"] > 0
    assert "TTFT p99.9 ms" in capsys.readouterr().err


def test_bench_route_wants_a_trace_or_a_workload(capsys):
    assert pdserve(["bench", "route"]) == 1
    assert "--trace FILE or --workload NAME" in capsys.readouterr().err
