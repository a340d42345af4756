"""LLMEngine with a KV connector and the roles' hooks: a prefill engine exports, a decode
engine pulls, and the decode engine's tokens are the aggregated engine's.

The connector is the in-process stand-in of direct_kv_transfer.py. The policies
themselves (export, free, recompute or fail) are tested in tests/prefill_worker and
tests/decode_worker; here, what the engine does with hooks attached or without.
"""

from __future__ import annotations

import pytest

from common.sampling_params import SamplingParams
from decode_worker.consumer import ConsumerHooks
from prefill_worker.producer import ProducerHooks
from tests.engine.direct_kv_transfer import (
    BLOCK_SIZE,
    GREEDY,
    PROMPTS,
    DirectConnector,
    Link,
    make_engine,
    pair,
    run_decode,
    run_prefill,
)


def test_prefill_then_pull_then_decode_gives_the_aggregated_greedy_tokens(tiny):
    expected = make_engine(tiny).generate(PROMPTS, GREEDY)
    link, prefill, decode = pair(tiny)
    baseline_usage = prefill.stats().kv_cache_usage
    requests = {}
    for i, prompt in enumerate(PROMPTS):
        out = run_prefill(prefill, f"r{i}", prompt, GREEDY)
        assert out.finish_reason is None and out.new_token_ids == expected[i][:1]
        params = out.kv_transfer_params
        assert len(params["remote_block_ids"]) == -(-len(prompt) // BLOCK_SIZE)
        requests[f"r{i}"] = (prompt, {**params, "first_token_id": out.new_token_ids[0]})
    assert prefill.stats().num_held_requests == len(PROMPTS)
    tokens, done = run_decode(decode, requests, GREEDY)
    assert [tokens[f"r{i}"] for i in range(len(PROMPTS))] == [e[1:] for e in expected]
    assert set(done.values()) == {"length"}
    # every lease was released by the pulls, and the prefill engine frees the blocks
    prefill.process_kv_transfers()
    assert prefill.stats().num_held_requests == 0 and not link.leases
    assert prefill.stats().kv_cache_usage == baseline_usage == 0.0
    assert decode.stats().kv_cache_usage == 0.0


def test_one_engine_with_both_hook_sets_prefills_for_itself_and_pulls_from_itself(tiny):
    prompt = PROMPTS[2]
    expected = make_engine(tiny).generate([prompt], GREEDY)[0]
    engine = make_engine(tiny, "kv_both")
    connector = DirectConnector(Link(), "kv_both")
    engine.attach_kv_transfer(
        connector, [ProducerHooks.for_engine(engine, connector), ConsumerHooks.for_engine(engine, connector)]
    )
    out = run_prefill(engine, "p", prompt, GREEDY)
    params = {**out.kv_transfer_params, "first_token_id": out.new_token_ids[0]}
    tokens, done = run_decode(engine, {"d": (prompt, params)}, GREEDY)
    assert out.new_token_ids + tokens["d"] == expected and done == {"d": "length"}
    engine.process_kv_transfers()
    assert engine.stats().num_held_requests == 0 and engine.stats().kv_cache_usage == 0.0


def test_running_requests_decode_while_another_request_waits_for_its_pull(tiny):
    link, prefill, decode = pair(tiny)
    out = run_prefill(prefill, "remote", PROMPTS[2], GREEDY)
    decode.add_request("local", PROMPTS[0], GREEDY)
    decode.step()
    decode.kv_connector.held_back.add("remote")
    decode.add_request(
        "remote", PROMPTS[2], GREEDY, kv_transfer_params={**out.kv_transfer_params, "first_token_id": 1}
    )
    progressed = [o.request_id for _ in range(4) for o in decode.step()]
    assert progressed == ["local"] * 4
    assert decode.stats().num_waiting_for_remote_kv == 1


def test_prefill_only_and_kv_transfer_params_need_the_hooks_of_that_side(tiny):
    plain = make_engine(tiny)
    with pytest.raises(ValueError, match="kv_producer"):
        plain.add_request("a", [1, 2, 3], GREEDY, prefill_only=True)
    with pytest.raises(ValueError, match="kv_consumer"):
        plain.add_request("b", [1, 2, 3], GREEDY, kv_transfer_params={"first_token_id": 1})
    _, prefill, decode = pair(tiny)
    with pytest.raises(ValueError, match="kv_producer"):
        decode.add_request("c", [1, 2, 3], GREEDY, prefill_only=True)
    with pytest.raises(ValueError, match="kv_consumer"):
        prefill.add_request("d", [1, 2, 3], GREEDY, kv_transfer_params={"first_token_id": 1})
    assert not (prefill.has_unfinished_requests() or decode.has_unfinished_requests())


def test_an_abort_during_a_pull_frees_the_blocks_only_when_the_pull_ends(tiny):
    _, prefill, decode = pair(tiny)
    out = run_prefill(prefill, "r", PROMPTS[3], GREEDY)
    decode.kv_connector.held_back.add("r")
    decode.add_request(
        "r", PROMPTS[3], GREEDY, kv_transfer_params={**out.kv_transfer_params, "first_token_id": 1}
    )
    decode.step()
    assert decode.stats().num_waiting_for_remote_kv == 1
    (aborted,) = decode.abort_request("r")
    assert aborted.finished and aborted.finish_reason == "abort"
    assert not decode.has_unfinished_requests() and decode.stats().kv_cache_usage > 0
    decode.kv_connector.held_back.clear()  # the transfer ends
    decode.process_kv_transfers()
    assert not decode.has_unfinished_requests()
    assert decode.stats().kv_cache_usage == 0.0 and not decode.has_kv_transfers()


def test_a_second_connector_is_refused(tiny):
    _, prefill, _ = pair(tiny)
    with pytest.raises(RuntimeError, match="already attached"):
        prefill.attach_kv_transfer(DirectConnector(Link(), "kv_producer"), [])


def test_aborting_an_unknown_or_finished_id_does_nothing(tiny):
    engine = make_engine(tiny)
    engine.generate([PROMPTS[0]], SamplingParams(max_tokens=2))
    assert engine.abort_request(["never-seen"]) == []
