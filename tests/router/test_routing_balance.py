"""The balance check: a worker is left out when this request's own work would take it more
than the threshold above the mean; a long cached context keeps it (the move factor); and
every candidate is still rated in the decision."""

from __future__ import annotations

from common.kv_events import BlockStored
from common.protocol import WorkerRole
from router.policy import PolicyWeights, RoutingPolicy
from router.prefix_index import PrefixIndex
from router.worker_state import WorkerState
from tests.harness.manual_clock import ManualClock as Clock

BLOCK = 16


def _workers(*names: str, clock: Clock | None = None) -> list[WorkerState]:
    clock = clock or Clock()
    return [WorkerState(n, WorkerRole.DECODE, f"sim://{n}", clock=clock) for n in names]


def _index_holding(worker_id: str, blocks: int) -> PrefixIndex:
    index = PrefixIndex()
    stored = BlockStored(
        block_hashes=list(range(blocks)), parent_block_hash=None, token_ids=[], block_size=BLOCK
    )
    index.apply_event(worker_id, stored)
    return index


def _policy(index: PrefixIndex, **weights: float) -> RoutingPolicy:
    return RoutingPolicy(index, BLOCK, PolicyWeights(**{"balance_move_factor": 0.0, **weights}))


def test_nothing_is_left_out_before_any_work_was_routed():
    hot, idle = _workers("hot", "idle")
    policy = _policy(_index_holding("hot", 10))
    assert policy.choose([hot, idle], list(range(10)), 10 * BLOCK)[0] is hot


def test_a_worker_above_the_mean_is_left_out_when_this_request_would_take_it_over():
    hot, b, c = _workers("hot", "b", "c")
    policy = _policy(_index_holding("hot", 10))
    for worker, tokens in ((hot, 1200), (b, 900), (c, 900)):
        policy.picker.note_routed(worker, tokens)
    # mean 1,000; hot is 20 % above it and stays so with this fully cached prompt
    assert policy.choose([hot, b, c], list(range(10)), 10 * BLOCK)[0] is not hot
    relaxed = _policy(_index_holding("hot", 10), balance_threshold=0.5)
    for worker, tokens in ((hot, 1200), (b, 900), (c, 900)):
        relaxed.picker.note_routed(worker, tokens)
    assert relaxed.choose([hot, b, c], list(range(10)), 10 * BLOCK)[0] is hot


def test_a_worker_at_the_mean_keeps_its_cached_request():
    hot, b = _workers("hot", "b")
    policy = _policy(_index_holding("hot", 10))
    for worker in (hot, b):
        policy.picker.note_routed(worker, 1000)
    assert policy.choose([hot, b], list(range(10)), 10 * BLOCK)[0] is hot


def test_the_move_factor_keeps_a_long_cached_context_on_a_worker_a_little_over():
    def choose(factor: float) -> str:
        hot, b, c = _workers("hot", "b", "c")
        policy = _policy(_index_holding("hot", 100), balance_move_factor=factor)
        for worker, tokens in ((hot, 5000), (b, 4000), (c, 4000)):
            policy.picker.note_routed(worker, tokens)
        # hot would be 450 tokens over its limit (5,000 against 1.05 × 13,000 / 3);
        # elsewhere the request computes 1,600 tokens more
        return policy.choose([hot, b, c], list(range(100)), 100 * BLOCK)[0].worker_id

    assert choose(0.0) != "hot"
    assert choose(0.25) != "hot"  # 0.25 × 1,600 = 400 < 450
    assert choose(0.5) == "hot"  # 800 > 450


def test_every_candidate_is_rated_in_the_decision_even_when_left_out():
    hot, b = _workers("hot", "b")
    policy = _policy(_index_holding("hot", 10))
    policy.picker.note_routed(hot, 5000)
    chosen, decision = policy.choose([hot, b], list(range(10)), 10 * BLOCK)
    assert chosen is b and set(decision.scores) == {"hot", "b"}
    assert decision.score == decision.scores["b"]["total"]
