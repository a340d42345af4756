"""LLMEngine with a KV connector: a prefill engine exports, a decode engine pulls, and
the decode engine's tokens are the aggregated engine's.

The connector here is an in-process stand-in that copies blocks between the two engines'
KV tensors and follows the connector contract (exactly one pull or release per request,
results reported by poll()); the real connectors run in tests/worker/.
"""

from __future__ import annotations

import pytest
import torch

from common.config.engine_config import EngineConfig
from common.config.kv_transfer_config import KVTransferConfig
from common.engine.llm_engine import LLMEngine
from common.sampling_params import SamplingParams
from tests.tiny_llama import tiny_llama

BLOCK_SIZE = 4


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama()


class Link:
    """What the two stand-in connectors share: the producer's cache and its leases."""

    def __init__(self) -> None:
        self.producer_cache: torch.Tensor | None = None
        self.leases: dict[str, list[int]] = {}
        self.released: list[str] = []
        self.fail_next = False
        self.refuse_next = False


class DirectConnector:
    def __init__(self, link: Link, role: str) -> None:
        self.link = link
        self.is_producer = role == "kv_producer"
        self.is_consumer = role == "kv_consumer"
        self.cache: torch.Tensor | None = None
        self.pulls: list[tuple[str, list[int], list[int]]] = []
        self._results: list[tuple[str, str | None]] = []
        self.held_back: set[str] = set()  # pulls that stay in flight until let go

    def register_kv_cache(self, kv_cache: torch.Tensor) -> None:
        self.cache = kv_cache
        if self.is_producer:
            self.link.producer_cache = kv_cache

    def export_blocks(self, request_id, block_ids, num_tokens):
        self.link.leases[request_id] = list(block_ids)
        return {
            "remote_block_ids": list(block_ids),
            "remote_num_tokens": num_tokens,
            "remote_request_id": request_id,
        }

    def take_freed_requests(self):
        freed, self.link.released = self.link.released, []
        for rid in freed:
            self.link.leases.pop(rid, None)
        return freed

    def start_pull(self, request_id, params, local_block_ids, remote_block_ids):
        if self.link.refuse_next:
            self.link.refuse_next = False
            raise ValueError("local block ids [0] are outside 1..63")
        assert request_id not in [p[0] for p in self.pulls], "one pull per request"
        self.pulls.append((request_id, list(local_block_ids), list(remote_block_ids)))
        if self.link.fail_next:
            self.link.fail_next = False
            self._results.append((request_id, "the producer is gone"))
        else:
            self.cache[local_block_ids] = self.link.producer_cache[remote_block_ids]
            self._results.append((request_id, None))
        self.link.released.append(params["remote_request_id"])

    def poll(self):
        ready = [r for r in self._results if r[0] not in self.held_back]
        self._results = [r for r in self._results if r[0] in self.held_back]
        return [rid for rid, err in ready if err is None], [
            (rid, err) for rid, err in ready if err is not None
        ]

    def notify_done(self, request_id, params):
        self.link.released.append(params["remote_request_id"])


def make_engine(tiny, role: str | None = None, policy: str = "fail") -> LLMEngine:
    model, model_config = tiny
    transfer = None
    if role is not None:
        transfer = KVTransferConfig(kv_connector="TcpConnector", kv_role=role, kv_load_failure_policy=policy)
    config = EngineConfig(
        device="cpu",
        block_size=BLOCK_SIZE,
        num_gpu_blocks_override=64,
        max_model_len=128,
        max_num_batched_tokens=32,
        kv_transfer_config=transfer,
    )
    return LLMEngine.from_config(config, model=model, model_config=model_config)


def pair(tiny, policy: str = "fail"):
    link = Link()
    prefill, decode = make_engine(tiny, "kv_producer"), make_engine(tiny, "kv_consumer", policy)
    prefill.attach_kv_connector(DirectConnector(link, "kv_producer"))
    decode.attach_kv_connector(DirectConnector(link, "kv_consumer"))
    return link, prefill, decode


def run_prefill(engine: LLMEngine, rid: str, prompt: list[int], params: SamplingParams):
    engine.add_request(rid, prompt, params, prefill_only=True)
    while True:
        for out in engine.step():
            if out.request_id == rid:
                assert out.finished
                return out


def run_decode(engine: LLMEngine, requests: dict[str, tuple[list[int], dict]], params: SamplingParams):
    tokens = {rid: [] for rid in requests}
    done: dict[str, str | None] = {}
    for rid, (prompt, kv_params) in requests.items():
        engine.add_request(rid, prompt, params, kv_transfer_params=kv_params)
    for _ in range(500):
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            if out.finished:
                done[out.request_id] = out.error or out.finish_reason
        if len(done) == len(requests):
            return tokens, done
    raise AssertionError("the decode engine did not finish")


PROMPTS = [[(7 * i + 3 * k) % 64 for k in range(n)] for i, n in enumerate((5, 13, 16, 30))]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


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


def test_a_failed_pull_is_recomputed_locally_under_the_recompute_policy(tiny):
    prompt = PROMPTS[3]
    expected = make_engine(tiny).generate([prompt], GREEDY)[0]
    link, prefill, decode = pair(tiny, policy="recompute")
    out = run_prefill(prefill, "r", prompt, GREEDY)
    link.fail_next = True
    tokens, done = run_decode(
        decode, {"r": (prompt, {**out.kv_transfer_params, "first_token_id": expected[0]})}, GREEDY
    )
    assert tokens["r"] == expected[1:] and done == {"r": "length"}
    assert decode.stats().num_kv_load_failures == 1


def test_a_failed_pull_fails_the_request_under_the_fail_policy(tiny):
    link, prefill, decode = pair(tiny, policy="fail")
    out = run_prefill(prefill, "r", PROMPTS[1], GREEDY)
    link.fail_next = True
    params = {**out.kv_transfer_params, "first_token_id": out.new_token_ids[0]}
    tokens, done = run_decode(decode, {"r": (PROMPTS[1], params)}, GREEDY)
    assert tokens["r"] == [] and "the producer is gone" in done["r"]
    assert decode.stats().kv_cache_usage == 0.0


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


def test_prefill_only_and_kv_transfer_params_need_a_connector_of_that_role(tiny):
    plain = make_engine(tiny)
    with pytest.raises(ValueError, match="kv_producer"):
        plain.add_request("a", [1, 2, 3], GREEDY, prefill_only=True)
    with pytest.raises(ValueError, match="kv_consumer"):
        plain.add_request("b", [1, 2, 3], GREEDY, kv_transfer_params={"first_token_id": 1})
    _, _, decode = pair(tiny)
    with pytest.raises(ValueError, match="first_token_id"):
        decode.add_request("c", [1, 2, 3], GREEDY, kv_transfer_params={"remote_block_ids": [1]})


def test_a_pull_the_connector_refuses_to_start_releases_the_producer_and_is_recomputed(tiny):
    prompt = PROMPTS[1]
    expected = make_engine(tiny).generate([prompt], GREEDY)[0]
    link, prefill, decode = pair(tiny, policy="recompute")
    out = run_prefill(prefill, "r", prompt, GREEDY)
    link.refuse_next = True
    params = {**out.kv_transfer_params, "first_token_id": expected[0]}
    tokens, done = run_decode(decode, {"r": (prompt, params)}, GREEDY)
    assert tokens["r"] == expected[1:] and done == {"r": "length"}
    assert link.released == ["r"]  # released without a pull: the producer frees the blocks
    prefill.process_kv_transfers()
    assert prefill.stats().kv_cache_usage == 0.0


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
    assert decode.process_kv_transfers() == []
    assert decode.stats().kv_cache_usage == 0.0 and not decode.has_kv_transfers()
