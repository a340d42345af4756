"""`pdserve bench route`'s LoRA workload: requests name Zipf-popular adapters over
per-adapter system prompts; a simulated worker holds --max-cpu-loras adapters (LRU), loads
a missing one inside the step that admits its request and lists what it holds in its load
reports; and routing that knows where adapters are loads fewer of them than routing that
does not."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from pdserve.bench.route_sim import ServiceModel, replay
from pdserve.bench.route_sim.adapter_cache import AdapterCache
from pdserve.bench.route_sim.sim_worker import Message, SimRequest, SimWorker
from pdserve.bench.route_sim.workloads import LoRATraceRequest, generate, lora, lora_of
from pdserve.bench.trace import TRACE_BLOCK_SIZE, TraceRequest
from pdserve.cli.main import main as pdserve

# 1,000 tokens/s, 10 ms a step, 200 ms an adapter load: step times by hand
SIMPLE = ServiceModel(
    token_rate=1000.0,
    step_overhead_s=0.01,
    attention_crossover_tokens=0,
    kv_read_s_per_ktoken=0.0,
    max_num_batched_tokens=1000,
    lora_load_s=0.2,
)


# -- the adapter cache ---------------------------------------------------------------------------


def test_the_adapter_cache_loads_a_missing_adapter_and_evicts_the_least_recently_used():
    cache = AdapterCache(capacity=2)
    assert [cache.use(name) for name in ("a", "b", "a", "c")] == [True, True, False, True]
    assert cache.names() == ["a", "c"] and "b" not in cache  # b was used least recently
    assert cache.use(None) is False and cache.num_loads == 3  # the base model loads nothing
    with pytest.raises(ValueError, match="--max-cpu-loras must be at least 1"):
        AdapterCache(0)


# -- the workload --------------------------------------------------------------------------------


def test_the_lora_workload_repeats_by_seed_and_names_popular_adapters_most():
    trace = lora(seed=0, duration_s=300)
    assert trace == lora(seed=0, duration_s=300) and trace != lora(seed=1, duration_s=300)
    assert all(isinstance(r, LoRATraceRequest) for r in trace)
    counts = Counter(lora_of(r) for r in trace)
    assert set(counts) <= {f"lora-{k}" for k in range(16)}
    assert counts["lora-0"] > 0.25 * len(trace)  # 1/1 of a Zipf(1.1) sum of 3.0 over 16
    assert counts["lora-0"] > counts["lora-3"] > counts["lora-15"]
    for r in trace:
        assert len(r.hash_ids) == -(-r.input_length // TRACE_BLOCK_SIZE)
    assert len({lora_of(r) for r in lora(seed=0, duration_s=300, num_adapters=3)}) == 3
    assert generate("lora", seed=0, num_adapters=3, duration_s=60) == lora(0, 60, num_adapters=3)


def test_an_adapters_requests_share_its_system_prompt_and_no_block_with_another_adapter():
    trace = lora(seed=0, duration_s=300)
    owners: dict[int, set] = {}
    for r in trace:
        for h in r.hash_ids:
            owners.setdefault(h, set()).add(lora_of(r))
    assert all(len(names) == 1 for names in owners.values())  # the adapter is in every block's id
    firsts = Counter((lora_of(r), r.hash_ids[0]) for r in trace)
    assert len({name for name, _ in firsts}) == len(firsts)  # one first block per adapter


def test_a_plain_trace_request_names_no_adapter():
    assert lora_of(TraceRequest(0.0, 10, 1, (1,))) is None


# -- the simulated worker ----------------------------------------------------------------------


def _request(n: int, lora_name: str | None, arrival_s: float = 0.0) -> SimRequest:
    return SimRequest(str(n), LoRATraceRequest(arrival_s, 490, 1, (100 + n,), lora_name))


def test_the_step_that_admits_a_request_on_a_missing_adapter_waits_for_its_load():
    worker = SimWorker("w0", capacity_blocks=10, model=SIMPLE, max_cpu_loras=1)
    worker.submit(_request(0, "sql"), 0.0)
    worker.advance(10.0)
    # 10 ms + 490 tokens at 1,000/s + one 200 ms load
    first = [payload for _, kind, payload in worker.outbox if kind is Message.FIRST_TOKEN]
    assert first[0].ttft_s == pytest.approx(0.7)
    assert worker.load().loras == ["sql"] and worker.adapters.num_loads == 1
    worker.submit(_request(1, "sql", arrival_s=1.0), 1.0)  # held now: no load
    worker.submit(_request(2, None, arrival_s=1.0), 1.0)  # the base model, in the step after 1's
    worker.submit(_request(3, "chat", arrival_s=1.0), 1.0)  # in that step too; evicts sql
    worker.advance(10.0)
    first = [payload for _, kind, payload in worker.outbox if kind is Message.FIRST_TOKEN]
    # 1: 10 ms + 490 tokens; 2 and 3 wait for it, then 10 ms + 980 tokens + chat's load, together
    assert [r.ttft_s for r in first[1:]] == [pytest.approx(0.5), pytest.approx(1.69), pytest.approx(1.69)]
    assert worker.load().loras == ["chat"] and worker.adapters.num_loads == 2


# -- the replay ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_trace():
    return lora(seed=0, duration_s=90)  # about 360 requests


@pytest.fixture(scope="module")
def replays(short_trace):
    return {
        name: replay(short_trace, name, num_workers=4, blocks_per_worker=200)
        for name in ("least_loaded", "adapter_blind", "prefix")
    }


def test_adapter_aware_routing_loads_fewer_adapters_than_adapter_blind_and_least_loaded(replays):
    aware, blind, least = replays["prefix"], replays["adapter_blind"], replays["least_loaded"]
    assert aware.lora_requests == blind.lora_requests == least.lora_requests > 300
    # 4 workers of 4 adapters each for 16 adapters: every policy loads some (64, 82 and 188)
    assert aware.lora_loads < blind.lora_loads < least.lora_loads
    assert 2 * aware.lora_loads < least.lora_loads


def test_a_lora_replay_repeats_exactly(short_trace, replays):
    again = replay(short_trace, "prefix", num_workers=4, blocks_per_worker=200)
    ours = replays["prefix"]
    assert (again.lora_loads, again.hit_rate, again.ttft_p99_ms, again.prefill_tokens_per_worker) == (
        ours.lora_loads, ours.hit_rate, ours.ttft_p99_ms, ours.prefill_tokens_per_worker
    )  # fmt: skip


# -- the command ----------------------------------------------------------------------------------


def test_bench_route_on_the_lora_workload_adds_the_adapter_blind_row_and_counts_loads(tmp_path, capsys):
    out = tmp_path / "route.json"
    args = ["bench", "route", "--workload", "lora", "--seed", "0", "--max-requests", "150", "--num-workers",
            "4", "--max-cpu-loras", "2", "--lora-load-ms", "80", "--output-json", str(out)]  # fmt: skip
    assert pdserve(args) == 0
    report = json.loads(out.read_text())
    assert set(report["policies"]) == {
        "round_robin",
        "least_loaded",
        "longest_prefix",
        "prefix",
        "adapter_blind",
    }
    assert report["max_cpu_loras"] == 2 and report["service_model"]["lora_load_s"] == 0.08
    assert all(result["lora_requests"] == 150 for result in report["policies"].values())
    assert "adapter loads" in capsys.readouterr().err


def test_the_suite_replays_the_lora_workload_beside_the_others_only_when_named(tmp_path, capsys):
    out = tmp_path / "suite.json"
    args = ["bench", "route", "--suite", "--workload", "bursty,lora", "--max-requests", "20",
            "--num-workers", "2", "--output-json", str(out)]  # fmt: skip
    assert pdserve(args) == 0
    runs = json.loads(out.read_text())["runs"]
    assert len(runs) == 14
    for run in runs:
        blind = "adapter_blind" in run["policies"]
        assert blind == (run["workload"] == "lora")
        assert all(r["lora_loads"] == 0 for r in run["policies"].values()) or run["workload"] == "lora"
    assert "adapter loads" in capsys.readouterr().err
