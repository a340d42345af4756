"""The engine with --enable-lora on the tiny model: the scheduler never runs more adapters
in a step than --max-loras, requests under one adapter give the same tokens alone or
mixed, KV events carry the adapter, and a bad adapter fails only its own request."""

from __future__ import annotations

import pytest

from common.block_hash import block_extra_keys, event_hash, hash_request_blocks
from common.config.engine_config import EngineConfig
from common.config.kv_events_config import KVEventsConfig
from common.config.lora_config import LoRAConfig
from common.engine.llm_engine import LLMEngine
from common.kv_events import BlockStored
from common.lora.adapter_slots import AdapterSlots
from common.lora.lora_request import LoRARequest
from common.lora.peft_adapter import LoRAError
from common.sampling_params import SamplingParams
from tests.lora.test_peft_adapter import write_adapter

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
PROMPTS = [[(5 * i + 3 * k) % 60 + 1 for k in range(9 + 2 * i)] for i in range(6)]


@pytest.fixture(scope="module")
def adapters(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_adapters")
    _, config = tiny
    targets = (("q_proj", "v_proj"), ("o_proj", "gate_proj", "up_proj", "down_proj"), ("k_proj", "down_proj"))
    return [
        LoRARequest(
            f"a{i}", str(write_adapter(root / f"a{i}", config, r=4 * (i + 1), alpha=8, targets=t)), i + 1
        )
        for i, t in enumerate(targets)
    ]


def _engine(tiny, max_loras: int, **settings) -> LLMEngine:
    model, model_config = tiny
    config = EngineConfig(
        device="cpu",
        max_model_len=128,
        lora_config=LoRAConfig(enable_lora=True, max_loras=max_loras, max_lora_rank=16, max_cpu_loras=4),
        **settings,
    )
    return LLMEngine.from_config(config, model=model, model_config=model_config)


def test_a_step_never_runs_more_adapters_than_max_loras_and_the_tokens_do_not_depend_on_it(
    tiny, adapters, monkeypatch
):
    loras = [adapters[i % 3] if i % 4 else None for i in range(len(PROMPTS))]
    alone = [
        _engine(tiny, 3).generate([p], GREEDY, loras=[lora])[0]
        for p, lora in zip(PROMPTS, loras, strict=True)
    ]
    counts = []
    assign = AdapterSlots.assign

    def counting(self, requested):
        counts.append(len({lora.name for lora in requested if lora is not None}))
        return assign(self, requested)

    monkeypatch.setattr(AdapterSlots, "assign", counting)
    mixed = _engine(tiny, 2).generate(PROMPTS, GREEDY, loras=loras)
    assert mixed == alone
    assert max(counts) == 2  # two adapters ran together, never three
    base = _engine(tiny, 3).generate(PROMPTS, GREEDY)
    assert [m != b for m, b in zip(mixed, base, strict=True)] == [lora is not None for lora in loras]


def test_kv_events_carry_the_adapter_and_its_extra_keys(tiny, adapters):
    engine = _engine(
        tiny, 1, block_size=4, kv_events_config=KVEventsConfig(enable_kv_cache_events=True, publisher="null")
    )
    lora = adapters[0]
    prompt = PROMPTS[3]
    engine.generate([prompt], GREEDY, loras=[lora])
    stored = [e for e in engine.kv_cache_manager.take_events() if isinstance(e, BlockStored)]
    assert stored and all(e.lora_id == lora.id and e.lora_name == lora.name for e in stored)
    first = stored[0]
    assert first.extra_keys[0] == [lora.name]  # published untagged: the name, as vLLM does
    expected = hash_request_blocks(prompt, 4, "sha256", lora=lora.hash_key)
    assert first.block_hashes[: len(expected)] == [event_hash(h) for h in expected]
    assert block_extra_keys(0, None, lora.hash_key) == (("lora", lora.name, lora.path),)


def test_a_bad_adapter_fails_its_request_and_nothing_else(tiny, adapters, tmp_path):
    engine = _engine(tiny, 2)
    with pytest.raises(LoRAError, match="is not a folder") as refused:
        engine.add_request(
            "bad", PROMPTS[0], GREEDY, lora_request=LoRARequest("gone", str(tmp_path / "gone"), 9)
        )
    assert refused.value.status == 400
    assert engine.lora_names() == [] and not engine.has_unfinished_requests()
    assert engine.generate([PROMPTS[0]], GREEDY, loras=[adapters[0]])[0]
    assert engine.lora_names() == ["a0"]


def test_without_enable_lora_a_request_naming_an_adapter_is_refused(tiny, adapters):
    model, model_config = tiny
    engine = LLMEngine.from_config(
        EngineConfig(device="cpu", max_model_len=128), model=model, model_config=model_config
    )
    with pytest.raises(LoRAError, match="without --enable-lora"):
        engine.add_request("r", PROMPTS[0], GREEDY, lora_request=adapters[0])


def test_unloading_an_adapter_keeps_its_running_requests_and_a_later_request_reads_it_again(tiny, adapters):
    engine = _engine(tiny, 2)
    lora = adapters[1]
    expected = engine.generate([PROMPTS[2]], GREEDY, loras=[lora])[0]
    engine.add_request("running", PROMPTS[2], GREEDY, lora_request=lora)
    tokens = [t for out in engine.step() for t in out.new_token_ids]
    assert engine.unload_lora(lora.name) and not engine.unload_lora(lora.name)
    assert lora.name not in engine.lora_names()
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens += out.new_token_ids
    assert tokens == expected
    assert engine.generate([PROMPTS[2]], GREEDY, loras=[lora])[0] == expected
    assert engine.lora_cache.num_loads == 2
