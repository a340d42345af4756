"""Which KV heads each consumer rank pulls from which producer rank (kvtransfer/tp_plan.py)."""

from __future__ import annotations

import pytest

from kvtransfer.tp_plan import ENDPOINTS_KEY, HeadPiece, producer_endpoints, pull_plan


def test_one_decode_rank_gathers_the_heads_of_both_prefill_ranks():
    # SmolLM2: 3 KV heads, prefill TP=2 holds 1 and 2 of them
    assert pull_plan(3, 2, 1, 0) == [HeadPiece(0, (0, 1), (0, 1)), HeadPiece(1, (0, 2), (1, 3))]


def test_two_decode_ranks_each_take_their_part_of_one_prefill_rank():
    assert pull_plan(3, 1, 2, 0) == [HeadPiece(0, (0, 1), (0, 1))]
    assert pull_plan(3, 1, 2, 1) == [HeadPiece(0, (1, 3), (0, 2))]


def test_uneven_splits_on_both_sides_cover_every_head_once():
    for producer_tp in (1, 2, 3):
        for consumer_tp in (1, 2, 3):
            pulled = []
            for rank in range(consumer_tp):
                pieces = pull_plan(3, producer_tp, consumer_tp, rank)
                local = [h for p in pieces for h in range(*p.local_heads)]
                assert local == list(range(len(local)))  # contiguous from the rank's first head
                pulled += [(p.producer_rank, p.remote_heads, p.local_heads) for p in pieces]
            assert sum(p[2][1] - p[2][0] for p in pulled) == 3


def test_a_replicated_head_is_pulled_from_its_first_replica():
    # 2 KV heads over 4 prefill ranks: ranks 0,1 hold head 0, ranks 2,3 head 1
    assert pull_plan(2, 4, 1, 0) == [HeadPiece(0, (0, 1), (0, 1)), HeadPiece(2, (0, 1), (1, 2))]


def test_params_without_one_endpoint_per_producer_rank_are_refused():
    params = {"remote_host": "h", "remote_port": 1, ENDPOINTS_KEY: [["h", 1, "a"]]}
    with pytest.raises(ValueError, match="for each of the producer's 2 tensor-parallel ranks"):
        producer_endpoints(params, 2)
    assert producer_endpoints({"remote_host": "h", "remote_port": 5}, 1) == [("h", 5, None)]
