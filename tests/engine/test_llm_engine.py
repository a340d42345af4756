"""The engine loop on the embedded model: the same greedy tokens as transformers, whatever
the scheduling (prefix caching, chunked prefill, preemption, batch size), and requests
that are checked on entry and leave no blocks behind."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from common.config.engine_config import EngineConfig
from common.config.kv_events_config import KVEventsConfig
from common.engine.engine_setup import resolve_engine_config
from common.engine.llm_engine import LLMEngine
from common.kv_events import BlockStored
from common.sampling_params import SamplingParams

NUM_TOKENS = 24
SYSTEM = "You are a helpful assistant. Answer the question below briefly, in one or two sentences.\n"
TEXTS = [
    SYSTEM + "Question: What is the capital of France?\nAnswer:",
    SYSTEM + "Question: Why is the sky blue?\nAnswer:",
    "def fibonacci(n):\n",
    "Once upon a time, in a small village by the sea,",
    "The three primary colors are",
]
GREEDY = SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0)


@pytest.fixture(scope="module")
def prompts(hf_smollm2_tokenizer) -> list[list[int]]:
    return [hf_smollm2_tokenizer(text)["input_ids"] for text in TEXTS]


@pytest.fixture(scope="module")
def reference(hf_smollm2, prompts) -> list[list[int]]:
    """transformers' greedy continuation of each prompt, one at a time (ends at EOS if reached)."""
    outputs = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = hf_smollm2.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=NUM_TOKENS, do_sample=False
            )
            outputs.append(out[0, len(prompt) :].tolist())
    return outputs


def make_engine(smollm2_model, **settings) -> LLMEngine:
    model, model_config = smollm2_model
    settings.setdefault("max_model_len", 256)
    settings.setdefault("num_gpu_blocks_override", 80)
    return LLMEngine.from_config(
        EngineConfig(device="cpu", **settings), model=model, model_config=model_config
    )


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param({}, id="defaults"),
        pytest.param({"enable_prefix_caching": False}, id="no-prefix-caching"),
        pytest.param({"max_num_batched_tokens": 16}, id="chunked-prefill-16"),
        pytest.param({"max_model_len": 96, "num_gpu_blocks_override": 10}, id="preemption"),
    ],
)
def test_greedy_outputs_equal_transformers(smollm2_model, prompts, reference, settings):
    engine = make_engine(smollm2_model, **settings)
    assert engine.generate(prompts, GREEDY) == reference
    stats = engine.stats()
    assert stats.kv_cache_usage == 0.0
    assert stats.num_running == stats.num_waiting == 0
    if "num_gpu_blocks_override" in settings:
        assert stats.num_preemptions > 0


@pytest.mark.parametrize("caching", [True, False], ids=["prefix-caching", "no-prefix-caching"])
def test_a_later_prompt_reuses_the_shared_prefix_only_with_caching(
    smollm2_model, prompts, reference, caching
):
    engine = make_engine(smollm2_model, enable_prefix_caching=caching)
    few = SamplingParams(max_tokens=8, temperature=0.0)
    assert engine.generate([prompts[0]], few) == [reference[0][:8]]
    assert engine.generate([prompts[1]], few) == [reference[1][:8]]
    # prompts 0 and 1 share the system text: its full blocks are computed once
    shared = len(_common_prefix(prompts[0], prompts[1])) // 16 * 16
    assert shared >= 16
    assert engine.stats().prefix_cache_hits == (shared if caching else 0)


def _common_prefix(a: list[int], b: list[int]) -> list[int]:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def test_one_request_at_a_time_equals_the_batch(smollm2_model, prompts, reference):
    engine = make_engine(smollm2_model, enable_prefix_caching=False)
    for i in (0, 4):  # the longest prompt and the shortest
        assert engine.generate([prompts[i]], GREEDY) == [reference[i]]


def test_many_copies_batched_together_each_equal_the_reference(smollm2_model, prompts, reference):
    engine = make_engine(smollm2_model, num_gpu_blocks_override=120)
    many = [prompts[i % len(prompts)] for i in range(10)]
    assert engine.generate(many, GREEDY) == [reference[i % len(prompts)] for i in range(10)]


def test_seeded_sampling_survives_preemption_and_batching(smollm2_model, prompts):
    params = [
        SamplingParams(max_tokens=16, temperature=1.0, seed=100 + i, ignore_eos=True)
        for i in range(len(prompts))
    ]
    roomy = make_engine(smollm2_model).generate(prompts, params)
    tight = make_engine(smollm2_model, max_model_len=96, num_gpu_blocks_override=10)
    assert tight.generate(prompts, params) == roomy
    assert tight.stats().num_preemptions > 0
    alone = make_engine(smollm2_model).generate(prompts[1:2], params[1:2])
    assert alone[0] == roomy[1]


def test_abort_mid_way_frees_every_block(smollm2_model, prompts):
    engine = make_engine(smollm2_model)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    for _ in range(4):
        engine.step()
    assert engine.stats().kv_cache_usage > 0

    aborted = engine.abort_request(["r1", "r3", "unknown"])
    assert [(o.request_id, o.finished, o.finish_reason) for o in aborted] == [
        ("r1", True, "abort"),
        ("r3", True, "abort"),
    ]
    lengths: dict[str, int] = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            assert output.request_id not in ("r1", "r3")
            lengths[output.request_id] = lengths.get(output.request_id, 0) + len(output.new_token_ids)
    assert sorted(lengths) == ["r0", "r2", "r4"]
    assert engine.stats().kv_cache_usage == 0.0
    # an aborted id may be used again
    engine.add_request("r1", prompts[0], SamplingParams(max_tokens=2, temperature=0.0))
    assert engine.abort_request("r1")[0].finish_reason == "abort"


def test_outputs_report_logprobs_and_finish(smollm2_model, prompts):
    engine = make_engine(smollm2_model)
    engine.add_request(
        "a", prompts[0], SamplingParams(max_tokens=3, temperature=0.0, logprobs=2, ignore_eos=True)
    )
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert [len(o.new_token_ids) for o in outputs] == [1, 1, 1]
    assert [o.finished for o in outputs] == [False, False, True]
    assert outputs[-1].finish_reason == "length"
    for output in outputs:
        (entry,) = output.new_logprobs
        assert entry.token_id == output.new_token_ids[0]
        assert entry.rank == 1 and len(entry.top) == 2  # greedy picks the most likely token
        assert entry.top[0] == (entry.token_id, pytest.approx(entry.logprob))
    stats = engine.stats()
    assert stats.num_generation_tokens == 3
    assert stats.num_prompt_tokens == len(prompts[0])  # decodes feed back outputs: not prefill work


def test_kv_events_report_the_blocks_a_request_stores(smollm2_model, prompts):
    engine = make_engine(smollm2_model, kv_events_config=KVEventsConfig(enable_kv_cache_events=True))
    (output,) = engine.generate([prompts[0]], SamplingParams(max_tokens=4, temperature=0.0))
    stored = [e for e in engine.take_kv_events() if isinstance(e, BlockStored)]
    computed = prompts[0] + output[:-1]  # the last sampled token is never fed back
    assert [t for e in stored for t in e.token_ids] == computed[: len(computed) // 16 * 16]
    assert engine.take_kv_events() == []  # each event is taken once


def test_kv_events_are_off_unless_configured(smollm2_model, prompts):
    engine = make_engine(smollm2_model)
    engine.generate([prompts[0]], SamplingParams(max_tokens=2, temperature=0.0))
    assert engine.take_kv_events() == []


@pytest.fixture(scope="module")
def engine(smollm2_model) -> LLMEngine:
    return make_engine(smollm2_model, max_model_len=64, num_gpu_blocks_override=8)


def test_add_request_refuses_a_prompt_and_completion_longer_than_the_context(engine):
    with pytest.raises(ValueError) as excinfo:
        engine.add_request("long", [1] * 50, SamplingParams(max_tokens=20))
    assert str(excinfo.value) == (
        "This model's maximum context length is 64 tokens. However, you requested 70 tokens "
        "(50 in the messages, 20 in the completion). Please reduce the length of the messages or completion."
    )
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ([], SamplingParams(), "prompt is empty"),
        ([1, 49152], SamplingParams(), "token id 49152 is outside the model's vocabulary"),
        ([-1, 5], SamplingParams(), "token id -1 is outside"),
        ([1, 2], SamplingParams(top_p=0.0), "top_p"),
        ([1, 2], SamplingParams(logprobs=21), "--max-logprobs"),
        ([1, 2], SamplingParams(stop_token_ids=[60000]), "stop_token_ids"),
    ],
)
def test_add_request_refuses_bad_requests(engine, prompt, params, message):
    with pytest.raises(ValueError, match=message):
        engine.add_request("bad", prompt, params)
    assert not engine.has_unfinished_requests()


def test_add_request_refuses_a_duplicate_live_id(engine):
    engine.add_request("dup", [1, 2, 3], SamplingParams(max_tokens=2))
    try:
        with pytest.raises(ValueError, match="already running"):
            engine.add_request("dup", [4, 5], SamplingParams(max_tokens=2))
    finally:
        engine.abort_request("dup")
    assert not engine.has_unfinished_requests()


def test_generate_takes_one_params_per_prompt(engine):
    with pytest.raises(ValueError, match="2 prompts but 1 SamplingParams"):
        engine.generate([[1, 2], [3, 4]], [SamplingParams()])


def test_the_engine_stops_on_the_models_eos(engine):
    assert engine.eos_token_id == 2  # SmolLM2's <|im_end|>
    request_params = SamplingParams(max_tokens=30, temperature=0.0, logit_bias={2: 100.0})
    (output,) = engine.generate([[1, 2, 3]], request_params)
    assert output == [2]


def test_extra_end_ids_of_the_generation_config_stop_requests(smollm2_model, tmp_path):
    (tmp_path / "generation_config.json").write_text(
        '{"eos_token_id": [2, 17], "temperature": 0.6, "top_p": 0.9, "max_new_tokens": 40}'
    )
    engine = make_engine(
        smollm2_model, generation_config=str(tmp_path), override_generation_config={"temperature": 0.2}
    )
    assert engine.eos_token_id == 2 and engine.extra_stop_token_ids == [17]
    params = SamplingParams(max_tokens=5, temperature=0.0, logit_bias={17: 100.0})
    engine.add_request("x", [1, 2, 3], params)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert outputs[-1].new_token_ids == [17] and outputs[-1].finish_reason == "stop"
    assert outputs[-1].stop_reason == 17
    assert params.stop_token_ids == []  # the caller's params are left as they were
    assert engine.default_sampling_overrides() == {"temperature": 0.2, "top_p": 0.9, "max_tokens": 40}


def test_a_gguf_model_has_no_generation_defaults(engine):
    assert engine.default_sampling_overrides() == {}


def test_override_generation_config_alone_gives_the_defaults(smollm2_model):
    engine = make_engine(smollm2_model, override_generation_config={"top_k": 5, "max_new_tokens": 7})
    assert engine.default_sampling_overrides() == {"top_k": 5, "max_tokens": 7}


def test_resolve_fills_the_defaults_from_model_and_device(smollm2_model):
    _, model_config = smollm2_model
    config = resolve_engine_config(EngineConfig(), model_config, torch.device("cpu"))
    assert config.max_model_len == 8192
    assert config.block_size == 16
    assert config.enable_prefix_caching is True
    assert config.enable_chunked_prefill is True
    assert config.max_num_batched_tokens == 2048
    assert config.max_num_seqs == 256
    assert config.device == "cpu"


def test_resolve_keeps_what_was_given(smollm2_model):
    _, model_config = smollm2_model
    given = EngineConfig(
        max_model_len=1000,
        block_size=32,
        enable_prefix_caching=False,
        enable_chunked_prefill=False,
        max_num_batched_tokens=4096,
        max_num_seqs=8,
    )
    config = resolve_engine_config(given, model_config, torch.device("cpu"))
    assert {f.name: getattr(config, f.name) for f in dataclasses.fields(given)} == {
        **{f.name: getattr(given, f.name) for f in dataclasses.fields(given)},
        "device": "cpu",
    }


def test_a_small_token_budget_lowers_the_default_sequence_limit(smollm2_model):
    _, model_config = smollm2_model
    config = resolve_engine_config(EngineConfig(max_num_batched_tokens=16), model_config, torch.device("cpu"))
    assert config.max_num_seqs == 16


def test_without_chunked_prefill_the_budget_covers_a_whole_prompt(smollm2_model):
    _, model_config = smollm2_model
    config = resolve_engine_config(
        EngineConfig(enable_chunked_prefill=False), model_config, torch.device("cpu")
    )
    assert config.max_num_batched_tokens == 8192


def test_a_context_longer_than_the_model_is_refused(smollm2_model):
    _, model_config = smollm2_model
    with pytest.raises(
        ValueError, match="--max-model-len 9000 is larger than the model's context length 8192"
    ):
        resolve_engine_config(EngineConfig(max_model_len=9000), model_config, torch.device("cpu"))


def test_settings_are_checked_before_any_weight_is_loaded(monkeypatch):
    import common.models.loader as loader

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded before the settings were checked")

    monkeypatch.setattr(loader, "load_model", no_loading)
    with pytest.raises(ValueError, match="--max-model-len 9000"):
        LLMEngine.from_config(EngineConfig(device="cpu", max_model_len=9000))


def test_a_tensor_parallel_size_the_heads_do_not_split_into_is_refused_with_a_clear_message(smollm2_model):
    _, model_config = smollm2_model  # 3 KV heads: 4 ranks can neither share nor replicate them
    with pytest.raises(ValueError, match="--tensor-parallel-size 4 does not fit"):
        resolve_engine_config(EngineConfig(tensor_parallel_size=4), model_config, torch.device("cpu"))


def test_a_cache_too_small_for_one_max_length_request_is_refused(smollm2_model):
    with pytest.raises(ValueError, match="--max-model-len") as excinfo:
        make_engine(smollm2_model, max_model_len=256, num_gpu_blocks_override=8)
    assert "--kv-cache-memory-bytes" in str(excinfo.value)
