"""How the engine times a decode worker's KV pulls (pdserve:kv_pull_seconds and
pdserve:kv_pull_bytes): from the consumer's hooks handing the pull to the connector until
the landed pull's request can be scheduled, once per pull that lands, with the blocks it
filled; on the real engine and the tiny model, the two engines joined in-process."""

from __future__ import annotations

import time

from common.engine.llm_engine import LLMEngine
from tests.engine.direct_kv_transfer import GREEDY, PROMPTS, pair, run_prefill

HELD_S = 0.05


def prefilled(prefill: LLMEngine, rid: str, prompt: list[int]) -> dict:
    out = run_prefill(prefill, rid, prompt, GREEDY)
    return {**out.kv_transfer_params, "first_token_id": out.new_token_ids[0]}


def step_until_finished(engine: LLMEngine, rid: str) -> str | None:
    for _ in range(200):
        for out in engine.step():
            if out.request_id == rid and out.finished:
                return out.error or out.finish_reason
        if not engine.has_unfinished_requests():
            return None
    raise AssertionError(f"request {rid} did not finish")


def test_a_pull_is_timed_from_its_hand_off_to_the_connector_until_it_joins_the_batch(tiny):
    link, prefill, decode = pair(tiny)
    prompt = PROMPTS[3]
    params = prefilled(prefill, "r", prompt)
    connector = decode.kv_connector
    connector.held_back.add("r")  # the data lands, but the poll does not report it yet
    decode.add_request("r", prompt, GREEDY, kv_transfer_params=params)
    decode.step()  # admits it and hands the pull to the connector
    assert connector.pulls and decode.take_landed_kv_pulls() == ()
    time.sleep(HELD_S)
    connector.held_back.clear()
    assert step_until_finished(decode, "r") == "length"
    (landed,) = decode.take_landed_kv_pulls()
    assert landed.request_id == "r"
    assert landed.num_blocks == len(connector.pulls[0][1]) == -(-len(prompt) // decode.config.block_size)
    assert landed.seconds >= HELD_S  # the wait for the poll is part of the pull
    assert decode.take_landed_kv_pulls() == ()  # each pull once


def test_only_the_blocks_pulled_count_after_local_prefix_hits(tiny):
    link, prefill, decode = pair(tiny)
    shared = PROMPTS[2]  # whole blocks, computed here first
    decode.generate([shared], GREEDY)
    prompt = [*shared, *PROMPTS[1]]
    params = prefilled(prefill, "r", prompt)
    decode.add_request("r", prompt, GREEDY, kv_transfer_params=params)
    assert step_until_finished(decode, "r") == "length"
    (landed,) = decode.take_landed_kv_pulls()
    pulled_local_ids = decode.kv_connector.pulls[0][1]
    assert landed.num_blocks == len(pulled_local_ids) < len(params["remote_block_ids"])


def test_failed_and_abandoned_pulls_are_not_timed(tiny):
    link, prefill, decode = pair(tiny, policy="recompute")
    link.fail_next = True
    decode.add_request(
        "failed", PROMPTS[1], GREEDY, kv_transfer_params=prefilled(prefill, "failed", PROMPTS[1])
    )
    assert step_until_finished(decode, "failed") == "length"  # recomputed here
    assert decode.stats().num_kv_load_failures == 1

    connector = decode.kv_connector
    connector.held_back.add("aborted")
    params = prefilled(prefill, "aborted", PROMPTS[3])
    decode.add_request("aborted", PROMPTS[3], GREEDY, kv_transfer_params=params)
    decode.step()
    decode.abort_request("aborted")
    connector.held_back.clear()
    decode.process_kv_transfers()  # the pull lands for a request that is gone
    assert not decode.has_kv_transfers()
    assert decode.take_landed_kv_pulls() == ()


def test_a_block_counts_the_whole_models_kv_of_its_tokens(tiny):
    _, _, decode = pair(tiny)
    model_config = decode.model_config
    itemsize = decode.runner.kv_cache.element_size()
    expected = (
        model_config.num_hidden_layers
        * 2
        * model_config.num_key_value_heads
        * decode.config.block_size
        * model_config.head_dim
        * itemsize
    )
    assert decode.kv_block_bytes == expected == decode.runner.kv_cache[0].nbytes
