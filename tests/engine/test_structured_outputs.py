"""Grammar-constrained decoding in the engine, on the embedded model: what a constrained
request writes follows its grammar, greedy tokens equal transformers' fp32 greedy under the
same masks, and the paths that move or replay a request (the prefill→decode hand-off,
preemption, async scheduling, a batch shared with free-text requests) change nothing."""

from __future__ import annotations

import re

import pytest
import torch

from common.config.engine_config import EngineConfig
from common.engine.llm_engine import LLMEngine
from common.sampling_params import SamplingParams
from common.structured_output.apply_bitmask import apply_token_bitmask_
from common.structured_output.grammar_cache import GrammarCache, GrammarTokenizer
from common.structured_output.matcher import GrammarMatcher, allocate_bitmask
from common.structured_output.spec import StructuredOutputSpec
from common.tokenizer import load_tokenizer
from decode_worker.consumer import ConsumerHooks
from prefill_worker.producer import ProducerHooks
from tests.engine.direct_kv_transfer import DirectConnector, Link, run_decode, run_prefill
from tests.structured_output.structured_checks import assert_valid_json

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 2},
    },
    "required": ["name", "age", "pets"],
    "additionalProperties": False,
}
PHONE = r"\(\d{3}\) \d{3}-\d{4}"
CITIES = ["Paris", "London", "Berlin", "Madrid"]


def spec_of(**params) -> StructuredOutputSpec:
    spec = StructuredOutputSpec.from_params(**params)
    assert spec is not None
    return spec


@pytest.fixture(scope="module")
def tokenizer(smollm2_source):
    return load_tokenizer(smollm2_source)


@pytest.fixture(scope="module")
def chat(tokenizer):
    def encode(question: str) -> list[int]:
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}])
        return tokenizer.encode(text, add_special_tokens=False)

    return encode


def make_engine(smollm2_model, role: str | None = None, **settings) -> LLMEngine:
    from common.config.kv_transfer_config import KVTransferConfig

    model, model_config = smollm2_model
    settings.setdefault("max_model_len", 256)
    settings.setdefault("num_gpu_blocks_override", 96)
    if role is not None:
        settings["kv_transfer_config"] = KVTransferConfig(kv_connector="TcpConnector", kv_role=role)
    config = EngineConfig(device="cpu", block_size=16, **settings)
    return LLMEngine.from_config(config, model=model, model_config=model_config)


@pytest.fixture(scope="module")
def engine(smollm2_model) -> LLMEngine:
    return make_engine(smollm2_model)


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, tuple]:
    """Every request to its end: (tokens, finish_reason) by id."""
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    tokens: dict[str, list[int]] = {rid: [] for rid in requests}
    ends: dict[str, str | None] = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            tokens[output.request_id].extend(output.new_token_ids)
            if output.finished:
                ends[output.request_id] = output.finish_reason
    return {rid: (tokens[rid], ends[rid]) for rid in requests}


class GrammarMask:
    """A transformers logits processor: the tokens a matcher of its own forbids at -inf."""

    def __init__(self, matcher: GrammarMatcher, num_prompt_tokens: int) -> None:
        self.matcher = matcher
        self.num_prompt_tokens = num_prompt_tokens
        self.bitmask = allocate_bitmask(1, matcher.vocab_size)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        generated = input_ids[0, self.num_prompt_tokens :].tolist()
        if generated:
            assert self.matcher.accept_token(generated[-1])
        self.matcher.fill_bitmask(self.bitmask)
        apply_token_bitmask_(scores, self.bitmask)
        return scores


def greedy(spec: StructuredOutputSpec | None, max_tokens: int = 48) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, structured_outputs=spec)


def test_greedy_json_schema_output_is_valid_and_ends_when_the_grammar_does(engine, chat, tokenizer):
    out = run(engine, {"p": (chat("Describe a person as JSON."), greedy(spec_of(json=PERSON), 64))})
    tokens, finish = out["p"]
    assert finish == "stop"
    assert_valid_json(tokenizer.decode(tokens), PERSON)


def test_constrained_greedy_tokens_equal_transformers_fp32_under_the_same_masks(
    engine, chat, tokenizer, hf_smollm2
):
    """The reference: transformers' greedy generate with the grammar's mask as a logits
    processor (a matcher of its own), fp32 on CPU."""
    transformers = pytest.importorskip("transformers")
    grammar_tokenizer = GrammarTokenizer.from_tokenizer(tokenizer, hf_smollm2.config.vocab_size)
    cache = GrammarCache()
    cases = [
        (chat("Describe a person as JSON."), spec_of(json=PERSON)),
        (chat("Give me a phone number."), spec_of(regex=PHONE)),
        (chat("Which city is the capital of Spain?"), spec_of(choice=CITIES)),
    ]
    for prompt, spec in cases:
        matcher = GrammarMatcher(cache.get(spec, grammar_tokenizer))
        ours, finish = run(engine, {"p": (prompt, greedy(spec))})["p"]
        assert finish == "stop"
        with torch.no_grad():
            reference = hf_smollm2.generate(
                torch.tensor([prompt]),
                max_new_tokens=len(ours),
                do_sample=False,
                logits_processor=transformers.LogitsProcessorList([GrammarMask(matcher, len(prompt))]),
                eos_token_id=None,
                pad_token_id=0,
            )[0, len(prompt) :].tolist()
        assert ours == reference, spec.kind
        assert matcher.accept_token(ours[-1]) and matcher.is_terminated()


def test_sampled_regex_and_choice_outputs_hold_their_constraint(engine, chat, tokenizer):
    requests = {}
    for i in range(12):
        requests[f"phone{i}"] = (
            chat("Give me a phone number."),
            SamplingParams(max_tokens=24, temperature=1.0, seed=i, structured_outputs=spec_of(regex=PHONE)),
        )
        requests[f"city{i}"] = (
            chat("Name a city."),
            SamplingParams(max_tokens=8, temperature=1.0, seed=i, structured_outputs=spec_of(choice=CITIES)),
        )
    out = run(engine, requests)
    for rid, (tokens, finish) in out.items():
        text = tokenizer.decode(tokens)
        if rid.startswith("phone"):
            assert re.fullmatch(PHONE, text), text
        else:
            assert text in CITIES, text
        assert finish == "stop"


def test_free_text_rows_in_a_constrained_batch_keep_their_tokens(engine, chat):
    free = (chat("Tell me about the sea."), greedy(None, 16))
    alone = run(engine, {"free": free})["free"]
    mixed = run(engine, {"free": free, "json": (chat("A person as JSON."), greedy(spec_of(json=PERSON)))})
    assert mixed["free"] == alone


def test_a_grammar_that_does_not_compile_is_refused_when_added(engine, chat):
    with pytest.raises(ValueError, match="invalid regex"):
        engine.add_request("bad", chat("hi"), greedy(StructuredOutputSpec("regex", "a(")))
    assert not engine.has_unfinished_requests()


def test_disaggregated_constrained_tokens_equal_the_aggregated_ones(smollm2_model, engine, chat, tokenizer):
    link = Link()
    prefill, decode = make_engine(smollm2_model, "kv_producer"), make_engine(smollm2_model, "kv_consumer")
    connector = DirectConnector(link, "kv_producer")
    prefill.attach_kv_transfer(connector, [ProducerHooks.for_engine(prefill, connector)])
    connector = DirectConnector(link, "kv_consumer")
    decode.attach_kv_transfer(connector, [ConsumerHooks.for_engine(decode, connector)])
    for name, spec in (("json", spec_of(json=PERSON)), ("phone", spec_of(regex=PHONE))):
        prompt = chat("Describe a person as JSON." if name == "json" else "Give me a phone number.")
        expected, _ = run(engine, {name: (prompt, greedy(spec))})[name]
        first = run_prefill(prefill, name, prompt, greedy(spec))
        assert first.new_token_ids == expected[:1]
        params = {**first.kv_transfer_params, "first_token_id": first.new_token_ids[0]}
        tokens, done = run_decode(decode, {name: (prompt, params)}, greedy(spec))
        assert first.new_token_ids + tokens[name] == expected and done[name] == "stop"
    # a producer that sampled its first token without the grammar: the consumer refuses it
    prompt = chat("Give me a phone number.")
    first = run_prefill(prefill, "free", prompt, greedy(None))
    letter = tokenizer.encode("x", add_special_tokens=False)[0]  # no phone number starts with x
    params = {**first.kv_transfer_params, "first_token_id": letter}
    tokens, done = run_decode(decode, {"free": (prompt, params)}, greedy(spec_of(regex=PHONE)))
    assert done == {"free": "abort"} and tokens["free"] == []


def test_preempted_constrained_requests_write_the_same_valid_output(smollm2_model, engine, chat, tokenizer):
    prompts = [chat(f"Describe person number {i} as JSON.") for i in range(4)]
    requests = {f"r{i}": (p, greedy(spec_of(json=PERSON), 64)) for i, p in enumerate(prompts)}
    expected = run(engine, requests)
    # four prompts of 2 blocks each, growing by up to 4 more: 11 usable blocks cannot hold them all
    tight = make_engine(smollm2_model, max_model_len=128, num_gpu_blocks_override=12)
    got = run(tight, requests)
    assert tight.scheduler.num_preemptions > 0
    assert got == expected
    for tokens, _ in got.values():
        assert_valid_json(tokenizer.decode(tokens), PERSON)


def test_async_scheduling_runs_constrained_steps_ahead_with_the_same_tokens(smollm2_model, engine, chat):
    requests = {
        "json": (chat("Describe a person as JSON."), greedy(spec_of(json=PERSON))),
        "free": (chat("Tell me about the sea."), greedy(None, 24)),
    }
    expected = run(engine, requests)
    ahead = make_engine(smollm2_model, async_scheduling=True)
    assert run(ahead, requests) == expected
    # the constrained request ran ahead too: its forward before its grammar's mask
    assert ahead.num_steps_ahead > 10


def test_a_grammar_that_waits_for_the_end_of_reasoning_leaves_the_text_before_it_free(
    engine, chat, tokenizer
):
    prompt = chat("Give me a phone number.")
    free, _ = run(engine, {"free": (prompt, greedy(None, 12))})["free"]
    end = free[3]  # stands for </think>: the model writes it unconstrained
    cut = free.index(end) + 1
    params = SamplingParams(
        max_tokens=40, temperature=0.0, structured_outputs=spec_of(regex=PHONE), structured_outputs_after=end
    )
    tokens, finish = run(engine, {"r": (prompt, params)})["r"]
    assert tokens[:cut] == free[:cut]
    assert re.fullmatch(PHONE, tokenizer.decode(tokens[cut:])) and finish == "stop"
