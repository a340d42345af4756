"""Greedy outputs under LoRA adapters equal transformers + peft's on the embedded model (fp32):
three adapters of different ranks and target modules and the base model mixed in one batch,
aggregated and disaggregated, with prefix caching on, and no cache hit across adapters."""

from __future__ import annotations

import copy

import pytest
import torch

from common.config.engine_config import EngineConfig
from common.config.kv_transfer_config import KVTransferConfig
from common.config.lora_config import LoRAConfig
from common.engine.llm_engine import LLMEngine
from common.engine.request import Request
from common.lora.lora_request import LoRARequest
from common.sampling_params import SamplingParams
from decode_worker.consumer import ConsumerHooks
from prefill_worker.producer import ProducerHooks
from tests.engine.direct_kv_transfer import DirectConnector, Link
from tests.lora.peft_adapters import SPECS, make_adapters

NUM_TOKENS = 32
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a faraway kingdom,",
    "def fibonacci(n):\n    ",
    "Here is a list of three fruits:\n1.",
    "Q: What is 12 times 7?\nA:",
    "Photosynthesis is the process by which",
    "Dear Sir or Madam,\n\nI am writing to",
    "Les chats sont des animaux qui",
    "SELECT name FROM users WHERE",
    "My favourite emoji is 🌊 because",
]
VARIANTS = (None, *(spec.name for spec in SPECS))  # None: the base model
GREEDY = SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def folders(hf_smollm2, tmp_path_factory):
    return make_adapters(hf_smollm2, tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def loras(folders) -> dict[str | None, LoRARequest | None]:
    adapters = {
        spec.name: LoRARequest(spec.name, str(folders[spec.name]), i + 1) for i, spec in enumerate(SPECS)
    }
    return {None: None, **adapters}


@pytest.fixture(scope="module")
def prompt_ids(hf_smollm2_tokenizer) -> list[list[int]]:
    return [hf_smollm2_tokenizer(p).input_ids for p in PROMPTS]


@pytest.fixture(scope="module")
def reference(
    hf_smollm2, hf_smollm2_tokenizer, folders, prompt_ids
) -> dict[tuple[str | None, int], list[int]]:
    """peft's greedy tokens of every (adapter, prompt), the adapters loaded into one PeftModel."""
    import peft

    first, *others = SPECS
    model = peft.PeftModel.from_pretrained(
        copy.deepcopy(hf_smollm2), str(folders[first.name]), adapter_name=first.name
    )
    for spec in others:
        model.load_adapter(str(folders[spec.name]), adapter_name=spec.name)
    model.eval()
    results = {}
    for variant in VARIANTS:
        for i, ids in enumerate(prompt_ids):
            inputs = torch.tensor([ids])
            kwargs = dict(
                attention_mask=torch.ones_like(inputs),
                max_new_tokens=NUM_TOKENS,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=hf_smollm2_tokenizer.pad_token_id,
            )
            with torch.no_grad():
                if variant is None:
                    with model.disable_adapter():
                        out = model.generate(inputs, **kwargs)
                else:
                    model.set_adapter(variant)
                    out = model.generate(inputs, **kwargs)
            results[(variant, i)] = out[0, len(ids) :].tolist()
    return results


def _lora_engine(model_and_config, **settings) -> LLMEngine:
    model, model_config = model_and_config
    lora = LoRAConfig(
        enable_lora=True,
        max_loras=settings.pop("max_loras", 3),
        max_lora_rank=16,
        max_cpu_loras=settings.pop("max_cpu_loras", 3),
    )
    config = EngineConfig(max_model_len=256, lora_config=lora, **settings)
    return LLMEngine.from_config(config, model=model, model_config=model_config)


def _jobs(prompt_ids, loras, variants=VARIANTS, prompts=None):
    prompts = range(len(PROMPTS)) if prompts is None else prompts
    return [(variant, i, prompt_ids[i], loras[variant]) for variant in variants for i in prompts]


def _assert_matches_reference(tokens, jobs, reference) -> None:
    mismatched = [
        (variant, i)
        for (variant, i, _, _), got in zip(jobs, tokens, strict=True)
        if got != reference[(variant, i)]
    ]
    assert not mismatched, f"outputs differ from peft's for (adapter, prompt) {mismatched}"


def test_the_adapters_change_the_answers(reference):
    """Else a run that ignored the adapters would pass the parity tests."""
    for spec in SPECS:
        changed = sum(reference[(spec.name, i)] != reference[(None, i)] for i in range(len(PROMPTS)))
        assert changed >= 5, f"adapter {spec.name} changes only {changed} of {len(PROMPTS)} answers"


def test_three_adapters_and_the_base_model_in_one_batch_match_peft(
    smollm2_model, prompt_ids, loras, reference
):
    engine = _lora_engine(smollm2_model)  # prefix caching on: the default
    jobs = _jobs(prompt_ids, loras)
    tokens = engine.generate([ids for _, _, ids, _ in jobs], GREEDY, loras=[lora for *_, lora in jobs])
    _assert_matches_reference(tokens, jobs, reference)
    # all 40 prompts fit the first step's budget: one forward ran all four together
    assert sorted(engine.runner.lora_slots.names()) == sorted(spec.name for spec in SPECS)
    assert engine.lora_cache.num_loads == 3


def test_one_slot_for_three_adapters_takes_turns_and_still_matches_peft(
    smollm2_model, prompt_ids, loras, reference
):
    engine = _lora_engine(smollm2_model, max_loras=1, max_cpu_loras=1)
    jobs = _jobs(prompt_ids, loras, prompts=range(3))
    tokens = engine.generate([ids for _, _, ids, _ in jobs], GREEDY, loras=[lora for *_, lora in jobs])
    _assert_matches_reference(tokens, jobs, reference)
    # one host slot too: every change of adapter read the folder again
    assert engine.runner.lora_slots.num_slot_loads >= 3 and engine.lora_cache.num_loads >= 3


def test_a_prompt_cached_under_one_adapter_is_never_a_hit_under_another(smollm2_model, prompt_ids, loras):
    engine = _lora_engine(smollm2_model, block_size=16)
    long_prompt = [t for ids in prompt_ids for t in ids]  # several full blocks
    assert len(long_prompt) > 48
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)

    runs = iter(range(100))

    def cached_tokens(variant) -> int:
        rid = f"cache-{next(runs)}"
        engine.add_request(rid, long_prompt, params, lora_request=loras[variant])
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.request_id == rid and out.finished:
                    return out.num_cached_tokens
        raise AssertionError("the request did not finish")

    assert cached_tokens("sql") == 0
    assert cached_tokens("chat") == 0  # the same tokens, another adapter: other blocks
    assert cached_tokens(None) == 0
    assert cached_tokens("sql") >= 48  # the same adapter again: its blocks are there
    assert cached_tokens(None) >= 48


@pytest.fixture(scope="module")
def producer_model(smollm2_model):
    """A second copy of the embedded model for the prefill engine (each engine's LoRA slots
    live on its own model's layers)."""
    model, model_config = smollm2_model
    return copy.deepcopy(model), model_config


def test_disaggregated_prefill_then_decode_matches_peft(
    smollm2_model, producer_model, prompt_ids, loras, reference
):
    link = Link()
    prefill = _lora_engine(
        producer_model,
        kv_transfer_config=KVTransferConfig(kv_connector="TcpConnector", kv_role="kv_producer"),
    )
    decode = _lora_engine(
        smollm2_model, kv_transfer_config=KVTransferConfig(kv_connector="TcpConnector", kv_role="kv_consumer")
    )
    connector = DirectConnector(link, "kv_producer")
    prefill.attach_kv_transfer(connector, [ProducerHooks.for_engine(prefill, connector)])
    connector = DirectConnector(link, "kv_consumer")
    decode.attach_kv_transfer(connector, [ConsumerHooks.for_engine(decode, connector)])
    jobs = _jobs(prompt_ids, loras)
    firsts: dict[str, tuple] = {}
    for n, (_, _, ids, lora) in enumerate(jobs):
        prefill.add_request(f"p{n}", ids, GREEDY, prefill_only=True, lora_request=lora)
    while len(firsts) < len(jobs):
        for out in prefill.step():
            if out.finished:
                assert out.error is None, out.error
                firsts[out.request_id] = (out.new_token_ids[0], out.kv_transfer_params)
    tokens = {f"d{n}": [] for n in range(len(jobs))}
    for n, (_, _, ids, lora) in enumerate(jobs):
        first, params = firsts[f"p{n}"]
        assert params.get("lora_name") == (None if lora is None else lora.name)
        decode.add_request(
            f"d{n}", ids, GREEDY, kv_transfer_params={**params, "first_token_id": first}, lora_request=lora
        )
        tokens[f"d{n}"].append(first)
    while decode.has_unfinished_requests():
        for out in decode.step():
            tokens[out.request_id] += out.new_token_ids
            assert out.error is None, out.error
    _assert_matches_reference([tokens[f"d{n}"] for n in range(len(jobs))], jobs, reference)
    assert decode.lora_cache.num_loads == 3  # the decode engine read each adapter when a request named it


def test_a_decode_request_under_another_adapter_than_its_prefill_is_refused(smollm2_model, prompt_ids, loras):
    decode = _lora_engine(
        smollm2_model, kv_transfer_config=KVTransferConfig(kv_connector="TcpConnector", kv_role="kv_consumer")
    )
    hooks = ConsumerHooks.for_engine(decode, DirectConnector(Link(), "kv_consumer"))
    params = {"lora_name": "sql", "first_token_id": 1}
    request = Request("x", prompt_ids[0], GREEDY, lora=loras["chat"], kv_transfer_params=params)
    with pytest.raises(ValueError, match="under LoRA adapter 'sql', but the request runs under 'chat'"):
        hooks.admit(request)
    base = Request("y", prompt_ids[0], GREEDY, kv_transfer_params=params)
    with pytest.raises(ValueError, match="under LoRA adapter 'sql', but the request runs under None"):
        hooks.admit(base)
