"""Prompts the router sent count as held by their worker until its KV events say so (or
the claim lapses), and the routing policy uses that to keep a burst on one prefix together."""

from __future__ import annotations

import pytest

from common.protocol import WorkerRole
from router.policy import PolicyWeights, RoutingPolicy
from router.policy.pending_prefixes import PendingPrefixes
from router.prefix_index import PrefixIndex
from router.worker_state import WorkerState
from tests.harness.manual_clock import ManualClock as Clock

BLOCK = 16


def test_a_sent_prompt_counts_as_held_for_its_leading_blocks_until_it_lapses():
    pending = PendingPrefixes(ttl_s=2.0)
    pending.note_sent("a", [1, 2, 3], now=0.0)
    pending.note_sent("b", [1, 2], now=0.5)
    assert pending.overlap([1, 2, 3, 4], now=1.0) == {"a": 3, "b": 2}
    assert pending.overlap([9, 1, 2], now=1.0) == {}  # only leading blocks count
    assert pending.overlap([1, 2, 3], now=2.0) == {"b": 2}  # a's claim lapsed
    assert pending.overlap([1, 2], now=2.5) == {} and len(pending) == 0


def test_claiming_a_prefix_again_keeps_it_pending_from_the_new_time():
    pending = PendingPrefixes(ttl_s=1.0)
    pending.note_sent("a", [1, 2], now=0.0)
    pending.note_sent("a", [1], now=0.8)
    assert pending.overlap([1, 2], now=1.2) == {"a": 1}  # block 2 lapsed, block 1 claimed again


def test_a_pending_time_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        PendingPrefixes(ttl_s=0)


def _workers(clock: Clock) -> list[WorkerState]:
    return [WorkerState(w, WorkerRole.DECODE, f"sim://{w}", clock=clock) for w in ("a", "b", "c")]


@pytest.mark.parametrize("pending_s", [0.0, 5.0])
def test_a_burst_on_one_new_prefix_stays_together_only_with_pending_prefixes(pending_s):
    clock = Clock()
    workers = _workers(clock)
    weights = PolicyWeights(pending_prefix_s=pending_s, balance_threshold=0)
    policy = RoutingPolicy(PrefixIndex(), BLOCK, weights)
    prefix = list(range(40))  # 640 tokens, in no worker's events yet
    chosen = []
    for i in range(3):
        clock.now = 0.01 * i
        worker, decision = policy.choose(workers, [*prefix, 100 + i], 41 * BLOCK)
        worker.note_request_sent(str(i), decision.new_prefill_tokens)
        chosen.append(worker.worker_id)
    if pending_s:
        assert len(set(chosen)) == 1
    else:
        assert len(set(chosen)) == 3  # each looks like a miss everywhere: spread by the load
