"""The prefill worker's policy (prefill_worker/producer.py) on the real engine and the tiny
model: export after the first token, hold the blocks, free them on the consumer's notice."""

from __future__ import annotations

import pytest

from common.sampling_params import SamplingParams
from prefill_worker.producer import ProducerHooks
from tests.engine.direct_kv_transfer import (
    BLOCK_SIZE,
    GREEDY,
    PROMPTS,
    DirectConnector,
    Link,
    make_engine,
    pair,
    run_prefill,
)


def test_the_blocks_are_exported_after_the_first_token_and_stay_held(tiny):
    expected = make_engine(tiny).generate([PROMPTS[1]], GREEDY)[0]
    link, prefill, _ = pair(tiny)
    out = run_prefill(prefill, "r", PROMPTS[1], GREEDY)
    assert out.finished and out.finish_reason is None and out.new_token_ids == expected[:1]
    assert out.error is None
    params = out.kv_transfer_params
    num_blocks = -(-len(PROMPTS[1]) // BLOCK_SIZE)
    assert params["remote_num_tokens"] == len(PROMPTS[1])
    assert params["remote_block_ids"] == link.leases["r"] and len(link.leases["r"]) == num_blocks
    # held: not running, not freed, whatever the next steps do
    for _ in range(3):
        assert prefill.step() == []
    assert prefill.stats().num_held_requests == 1 and not prefill.has_unfinished_requests()
    assert prefill.stats().kv_cache_usage > 0 and prefill.has_kv_transfers()


def test_the_blocks_are_freed_on_the_consumers_notice(tiny):
    link, prefill, _ = pair(tiny)
    run_prefill(prefill, "a", PROMPTS[2], GREEDY)
    run_prefill(prefill, "b", PROMPTS[3], GREEDY)
    prefill.process_kv_transfers()
    assert prefill.stats().num_held_requests == 2
    link.released.append("a")  # the consumer of "a" is done with it
    prefill.process_kv_transfers()
    assert prefill.stats().num_held_requests == 1 and set(link.leases) == {"b"}
    link.released.append("b")
    prefill.step()  # a step hears the connector's news too
    assert prefill.stats().num_held_requests == 0 and prefill.stats().kv_cache_usage == 0.0
    assert not prefill.has_kv_transfers()


def test_a_first_token_that_ends_the_request_exports_nothing(tiny):
    link, prefill, _ = pair(tiny)
    out = run_prefill(prefill, "one", PROMPTS[1], SamplingParams(max_tokens=1, temperature=0.0))
    assert out.finish_reason == "length" and out.kv_transfer_params is None
    assert not link.leases and prefill.stats().num_held_requests == 0
    assert prefill.stats().kv_cache_usage == 0.0


def test_an_export_the_connector_refuses_fails_the_request_and_frees_its_blocks(tiny):
    link, prefill, _ = pair(tiny)
    link.refuse_export = True
    out = run_prefill(prefill, "r", PROMPTS[2], GREEDY)
    assert out.finish_reason == "abort" and "the lease table is full" in out.error
    assert out.kv_transfer_params is None
    assert prefill.stats().num_held_requests == 0 and prefill.stats().kv_cache_usage == 0.0


def test_a_request_without_prefill_only_runs_to_its_end_here(tiny):
    expected = make_engine(tiny).generate([PROMPTS[0]], GREEDY)[0]
    _, prefill, _ = pair(tiny)
    assert prefill.generate([PROMPTS[0]], GREEDY)[0] == expected
    assert prefill.stats().num_held_requests == 0


def test_the_producer_needs_a_connector_that_exports(tiny):
    engine = make_engine(tiny, "kv_consumer")
    with pytest.raises(ValueError, match="kv_producer or kv_both"):
        ProducerHooks.for_engine(engine, DirectConnector(Link(), "kv_consumer"))
