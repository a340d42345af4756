"""Adapter-aware routing: a worker that holds the request's LoRA adapter saves its load,
which is worth what the load costs and no more (a hot adapter spreads once its holder's
queue outgrows one load); the router counts an adapter as held where its workers' load
reports list it and, for a while, where it just sent it; a base-model request is routed
exactly as before."""

from __future__ import annotations

import random

import pytest

from common.kv_events import BlockStored
from common.protocol import LoadReport, WorkerRole
from router.policy import EstimatedTTFTScorer, LoRAAffinityScorer, PolicyWeights, RequestView, RoutingPolicy
from router.policy.lora_affinity import FALLBACK_PREFILL_TOKENS_PER_S
from router.policy.lora_holders import LoRAHolders
from router.prefix_index import PrefixIndex
from router.worker_state import WorkerState
from tests.harness.manual_clock import ManualClock as Clock

BLOCK = 16
# the default lora_load_ms (50) at the fallback prefill speed, in queued prompt tokens
LOAD_TOKENS = 0.05 * FALLBACK_PREFILL_TOKENS_PER_S


def _worker(worker_id: str, clock: Clock | None = None, **load) -> WorkerState:
    worker = WorkerState(worker_id, WorkerRole.DECODE, f"sim://{worker_id}", clock=clock or Clock())
    if load:
        worker.update_load(LoadReport(**load))
    return worker


def _scorer(load_ms: float = 50.0) -> LoRAAffinityScorer:
    return LoRAAffinityScorer(EstimatedTTFTScorer(cache_miss_scale=6.0), load_ms)


# -- the scorer ---------------------------------------------------------------------------------


def test_the_scorer_rates_a_holder_one_and_a_cold_worker_down_by_the_load_over_the_largest_wait():
    workers = [_worker("a"), _worker("b", num_queued_prefill_tokens=4000)]
    view = RequestView(100, 6, BLOCK, {}, "sql", frozenset({"a"}))
    # estimated waits: a 600 (6 x 100 missing tokens), b 4,600; the load is 500 tokens
    assert _scorer().score(view, workers) == [1.0, pytest.approx(1 - LOAD_TOKENS / 4600)]
    assert _scorer().score(RequestView(100, 6, BLOCK, {}, "sql", frozenset({"b"})), workers)[0] == (
        pytest.approx(1 - LOAD_TOKENS / 4600)
    )


def test_a_base_model_request_rates_zero_everywhere():
    workers = [_worker("a", loras=["sql"]), _worker("b")]
    assert _scorer().score(RequestView(100, 6, BLOCK, {}, None, frozenset({"a"})), workers) == [0.0, 0.0]


def test_with_nothing_to_wait_for_only_a_holder_rates_above_zero():
    workers = [_worker("a"), _worker("b")]
    view = RequestView(4 * BLOCK, 4, BLOCK, {"a": 4, "b": 4}, "sql", frozenset({"b"}))  # all cached: no wait
    assert _scorer().score(view, workers) == [0.0, 1.0]


def test_the_load_is_priced_at_the_measured_prefill_speed_once_there_is_one():
    workers = [_worker("a"), _worker("b")]
    assert _scorer(50.0).load_cost(workers) == LOAD_TOKENS  # nothing measured yet
    workers[0].prefill_tokens_per_s, workers[1].prefill_tokens_per_s = 30_000.0, 10_000.0
    assert _scorer(50.0).load_cost(workers) == pytest.approx(1000.0)  # 50 ms at the mean, 20k tokens/s
    measured = LoRAAffinityScorer(EstimatedTTFTScorer(6.0, use_measured_speed=True), 50.0)
    assert measured.load_cost(workers) == 0.05  # the estimate is in seconds then
    with pytest.raises(ValueError, match="lora_load_ms must be 0 or more"):
        _scorer(-1.0)


# -- the policy -----------------------------------------------------------------------------------


def _policy(**weights) -> RoutingPolicy:
    return RoutingPolicy(PrefixIndex(), BLOCK, PolicyWeights(**weights))


def test_at_equal_load_the_policy_sends_a_request_where_its_adapter_is():
    for holder in ("a", "b", "c"):
        workers = [_worker(w, loras=["sql"] if w == holder else ["chat"]) for w in ("a", "b", "c")]
        worker, decision = _policy().choose(workers, list(range(8)), 8 * BLOCK, lora_name="sql")
        assert worker.worker_id == holder and not decision.loads_lora
        assert decision.scores[holder]["lora_affinity"] == 1.0


@pytest.mark.parametrize(
    ("holder_queue", "expected"),
    [(1000, "hot"), (1000 + LOAD_TOKENS - 100, "hot"), (1000 + LOAD_TOKENS + 100, "cold"), (5000, "cold")],
)
def test_a_busier_holder_keeps_the_request_only_while_its_extra_queue_is_shorter_than_one_load(
    holder_queue, expected
):
    # the cold worker has 1,000 prompt tokens queued; the prompt is cached nowhere
    workers = [
        _worker("hot", num_queued_prefill_tokens=int(holder_queue), num_running=40, loras=["sql"]),
        _worker("cold", num_queued_prefill_tokens=1000, num_running=2, loras=["chat"]),
    ]
    worker, decision = _policy().choose(workers, list(range(20)), 20 * BLOCK, lora_name="sql")
    assert worker.worker_id == expected
    assert decision.loads_lora == (expected == "cold")


def test_a_hot_adapters_holder_takes_its_requests_until_its_queue_outgrows_one_load():
    clock = Clock()
    workers = [_worker(w, clock, loras=["sql"] if w == "a" else []) for w in ("a", "b", "c", "d")]
    policy = _policy(balance_threshold=0.0)
    chosen = []
    for i in range(12):  # 400-token prompts of one adapter, faster than a worker prefills them
        clock.now = 0.01 * i
        worker, decision = policy.choose(workers, [1000 * i + k for k in range(25)], 400, lora_name="sql")
        worker.note_request_sent(str(i), decision.new_prefill_tokens)
        chosen.append(worker.worker_id)
    assert chosen[:2] == ["a", "a"]  # 400 queued on a is less than one load (500 tokens)
    assert chosen[2] != "a" and chosen[3] == chosen[2]  # 800 is more: a second worker loads it, and holds it


def test_a_burst_on_a_cold_adapter_stays_on_the_worker_that_loads_it():
    clock = Clock()
    workers = [_worker(w, clock) for w in ("a", "b", "c")]
    for weight, spread in ((1.0, 1), (0.0, 3)):
        policy = _policy(lora_affinity=weight, balance_threshold=0.0)
        chosen = []
        for i in range(3):
            clock.now += 0.01
            worker, decision = policy.choose(workers, [100 * i + 1, 100 * i + 2], 40, lora_name="math")
            chosen.append(worker.worker_id)
        # no report lists "math" yet: the first request's worker counts as holding it
        assert len(set(chosen)) == spread, (weight, chosen)


def test_a_sent_adapter_counts_as_held_until_the_pending_time_lapses_and_reports_count_always():
    holders = LoRAHolders(pending_s=1.0)
    workers = [_worker("a", loras=["sql"]), _worker("b"), _worker("c")]
    holders.note_sent("b", "sql", now=0.0)
    assert holders.holders("sql", workers, now=0.5) == {"a", "b"}
    assert holders.holders("sql", workers, now=1.0) == {"a"}
    assert holders.holders("chat", workers, now=0.0) == frozenset()
    LoRAHolders(pending_s=0.0).note_sent("c", "sql", now=0.0)  # 0: reports alone
    with pytest.raises(ValueError, match="0 or more seconds"):
        LoRAHolders(pending_s=-1)


def _random_fleet(rng: random.Random, clock: Clock, index: PrefixIndex) -> list[WorkerState]:
    workers = []
    for w in range(5):
        worker = _worker(
            f"w{w}",
            clock,
            num_queued_prefill_tokens=rng.choice([0, 0, 100, 2000, 9000]),
            num_running=rng.randrange(20),
            kv_cache_usage=rng.random(),
            num_kv_blocks=1000,
            loras=rng.sample(["sql", "chat", "math"], rng.randrange(3)),
        )
        held = rng.randrange(12)
        if held:
            index.apply_event(
                worker.worker_id,
                BlockStored(block_hashes=list(range(held)), parent_block_hash=None,
                            token_ids=[0] * held * BLOCK, block_size=BLOCK),
            )  # fmt: skip
        workers.append(worker)
    return workers


@pytest.mark.parametrize("seed", range(5))
def test_a_base_model_request_is_routed_as_without_the_adapter_scorer(seed):
    rng = random.Random(seed)
    clock = Clock()
    index = PrefixIndex()
    workers = _random_fleet(rng, clock, index)
    aware = RoutingPolicy(index, BLOCK, PolicyWeights())
    blind = RoutingPolicy(index, BLOCK, PolicyWeights(lora_affinity=0.0))  # today's pipeline
    for i in range(60):
        clock.now += rng.choice([0.0, 0.01, 0.5])
        hashes = list(range(rng.randrange(1, 16)))
        hashes[-1] += 1000 * i * rng.randrange(2)  # a new tail some of the time
        tokens = len(hashes) * BLOCK - rng.randrange(BLOCK)
        worker, ours = aware.choose(workers, hashes, tokens)
        theirs_worker, theirs = blind.choose(workers, hashes, tokens, lora_name=None)
        assert worker is theirs_worker
        assert (ours.score, ours.new_prefill_tokens, ours.loads_lora) == (
            theirs.score, theirs.new_prefill_tokens, False
        )  # fmt: skip
        assert ours.scores == theirs.scores
        worker.note_request_sent(str(i), ours.new_prefill_tokens, rng.randrange(8))


def test_the_adapter_weights_come_from_routing_weights_and_zero_routes_adapter_blind():
    weights = PolicyWeights.from_dict({"lora_affinity": 2, "lora_load_ms": 120})
    assert (weights.lora_affinity, weights.lora_load_ms) == (2.0, 120.0)
    assert "lora_affinity" in {s.name for s, _ in PolicyWeights().scorers()}
    assert "lora_affinity" not in {s.name for s, _ in PolicyWeights(lora_affinity=0).scorers()}
    with pytest.raises(ValueError, match="lora_load_ms must be a number, 0 or more"):
        PolicyWeights.from_dict({"lora_load_ms": -5})
