"""The decode worker's policy (decode_worker/consumer.py) on the real engine and the tiny
model: admission with the producer's first token, pulls, and recompute or fail per
kv_load_failure_policy."""

from __future__ import annotations

import pytest

from common.sampling_params import SamplingParams
from decode_worker.consumer import ConsumerHooks
from tests.engine.direct_kv_transfer import (
    GREEDY,
    PROMPTS,
    DirectConnector,
    Link,
    make_engine,
    pair,
    run_decode,
    run_prefill,
)


def prefilled(prefill, rid: str, prompt: list[int]) -> dict:
    """The kv_transfer_params a router sends the decode worker after `prefill` ran `prompt`."""
    out = run_prefill(prefill, rid, prompt, GREEDY)
    return {**out.kv_transfer_params, "first_token_id": out.new_token_ids[0]}


def test_a_failed_pull_is_recomputed_locally_under_the_recompute_policy(tiny):
    prompt = PROMPTS[3]
    expected = make_engine(tiny).generate([prompt], GREEDY)[0]
    link, prefill, decode = pair(tiny, policy="recompute")
    params = prefilled(prefill, "r", prompt)
    link.fail_next = True
    tokens, done = run_decode(decode, {"r": (prompt, params)}, GREEDY)
    assert tokens["r"] == expected[1:] and done == {"r": "length"}
    assert decode.stats().num_kv_load_failures == 1
    assert decode.stats().kv_cache_usage == 0.0


def test_a_failed_pull_fails_the_request_under_the_fail_policy(tiny):
    link, prefill, decode = pair(tiny, policy="fail")
    params = prefilled(prefill, "r", PROMPTS[1])
    link.fail_next = True
    tokens, done = run_decode(decode, {"r": (PROMPTS[1], params)}, GREEDY)
    assert tokens["r"] == [] and "the producer is gone" in done["r"]
    assert "kv_load_failure_policy is fail" in done["r"]
    assert decode.stats().num_kv_load_failures == 1
    assert decode.stats().kv_cache_usage == 0.0 and not decode.has_unfinished_requests()


@pytest.mark.parametrize(
    "params",
    [
        {"remote_block_ids": [1]},  # no first token
        {"remote_block_ids": [1], "first_token_id": 256},  # outside the tiny vocabulary
        {"remote_block_ids": [1], "first_token_id": -1},
        {"remote_block_ids": [1], "first_token_id": True},
        {"remote_block_ids": [1], "first_token_id": "7"},
    ],
)
def test_a_request_with_a_bad_first_token_id_is_refused_at_admission(tiny, params):
    link, _, decode = pair(tiny)
    with pytest.raises(ValueError, match="first_token_id"):
        decode.add_request("c", [1, 2, 3], GREEDY, kv_transfer_params=params)
    assert not decode.has_unfinished_requests() and not decode.has_kv_transfers()
    assert decode.kv_connector.pulls == [] and link.released == []


def test_a_pull_the_connector_refuses_to_start_releases_the_producer_and_is_recomputed(tiny):
    prompt = PROMPTS[1]
    expected = make_engine(tiny).generate([prompt], GREEDY)[0]
    link, prefill, decode = pair(tiny, policy="recompute")
    params = prefilled(prefill, "r", prompt)
    link.refuse_next = True
    tokens, done = run_decode(decode, {"r": (prompt, params)}, GREEDY)
    assert tokens["r"] == expected[1:] and done == {"r": "length"}
    assert link.released == ["r"]  # released without a pull: the producer frees the blocks
    prefill.process_kv_transfers()
    assert prefill.stats().kv_cache_usage == 0.0


def test_params_that_do_not_fit_the_prompt_release_the_producer_and_fail_under_fail(tiny):
    link, prefill, decode = pair(tiny, policy="fail")
    params = prefilled(prefill, "r", PROMPTS[3])
    tokens, done = run_decode(decode, {"other": (PROMPTS[2], {**params})}, GREEDY)
    assert tokens["other"] == [] and "remote blocks" in done["other"]
    assert decode.kv_connector.pulls == [] and link.released == ["r"]
    assert decode.stats().kv_cache_usage == 0.0


def test_a_first_token_that_already_ends_the_request_releases_the_producer(tiny):
    link, prefill, decode = pair(tiny)
    params = prefilled(prefill, "r", PROMPTS[2])
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    tokens, done = run_decode(decode, {"r": (PROMPTS[2], params)}, one)
    assert tokens["r"] == [] and done == {"r": "length"}
    assert link.released == ["r"] and decode.kv_connector.pulls == []


def test_the_policy_comes_from_the_kv_transfer_config_and_is_checked(tiny):
    engine = make_engine(tiny, "kv_consumer", policy="recompute")
    connector = DirectConnector(Link(), "kv_consumer")
    assert ConsumerHooks.for_engine(engine, connector).kv_load_failure_policy == "recompute"
    assert ConsumerHooks.for_engine(make_engine(tiny), connector).kv_load_failure_policy == "fail"
    with pytest.raises(ValueError, match="kv_load_failure_policy 'retry'"):
        ConsumerHooks(connector, engine.scheduler, vocab_size=engine.vocab_size, kv_load_failure_policy="retry")


def test_the_consumer_needs_a_connector_that_pulls(tiny):
    engine = make_engine(tiny, "kv_producer")
    with pytest.raises(ValueError, match="kv_consumer or kv_both"):
        ConsumerHooks.for_engine(engine, DirectConnector(Link(), "kv_producer"))
