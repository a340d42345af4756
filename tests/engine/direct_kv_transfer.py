"""Two engines on the tiny model joined by an in-process KV connector, for the tests of
the engine's KV-transfer hooks and of the roles' policies (tests/prefill_worker,
tests/decode_worker).

`DirectConnector` copies blocks between the two engines' KV tensors and follows the
connector contract (exactly one pull or release per request, results reported by
poll()); the real connectors run in tests/worker/.
"""

from __future__ import annotations

import torch

from common.config.engine_config import EngineConfig
from common.config.kv_transfer_config import KVTransferConfig
from common.engine.llm_engine import LLMEngine
from common.sampling_params import SamplingParams
from decode_worker.consumer import ConsumerHooks
from prefill_worker.producer import ProducerHooks

BLOCK_SIZE = 4
PROMPTS = [[(7 * i + 3 * k) % 64 for k in range(n)] for i, n in enumerate((5, 13, 16, 30))]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


class Link:
    """What the two stand-in connectors share: the producer's cache and its leases."""

    def __init__(self) -> None:
        self.producer_cache: torch.Tensor | None = None
        self.leases: dict[str, list[int]] = {}
        self.released: list[str] = []
        self.fail_next = False
        self.refuse_next = False
        self.refuse_export = False


class DirectConnector:
    def __init__(self, link: Link, role: str) -> None:
        self.link = link
        self.is_producer = role in ("kv_producer", "kv_both")
        self.is_consumer = role in ("kv_consumer", "kv_both")
        self.cache: torch.Tensor | None = None
        self.pulls: list[tuple[str, list[int], list[int]]] = []
        self._results: list[tuple[str, str | None]] = []
        self.held_back: set[str] = set()  # pulls that stay in flight until let go

    def register_kv_cache(self, kv_cache: torch.Tensor) -> None:
        self.cache = kv_cache
        if self.is_producer:
            self.link.producer_cache = kv_cache

    def export_blocks(self, request_id, block_ids, num_tokens):
        if self.link.refuse_export:
            raise RuntimeError("the lease table is full")
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
    """(link, prefill engine with the producer's hooks, decode engine with the consumer's)."""
    link = Link()
    prefill, decode = make_engine(tiny, "kv_producer"), make_engine(tiny, "kv_consumer", policy)
    connector = DirectConnector(link, "kv_producer")
    prefill.attach_kv_transfer(connector, [ProducerHooks.for_engine(prefill, connector)])
    connector = DirectConnector(link, "kv_consumer")
    decode.attach_kv_transfer(connector, [ConsumerHooks.for_engine(decode, connector)])
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
