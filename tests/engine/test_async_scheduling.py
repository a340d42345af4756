"""--async-scheduling: a decode step launched before the step feeding it has been read
back gives the tokens, finish reasons and block accounting of running one step at a time,
on the embedded model (CPU runs the same code path eagerly; the GPU test replays graphs)."""

from __future__ import annotations

import pytest
import torch

from common.config.arg_parser import PdserveArgumentParser
from common.config.engine_args import add_engine_args, engine_config_from_args
from common.config.engine_config import EngineConfig
from common.engine.llm_engine import LLMEngine
from common.sampling_params import SamplingParams

TEXTS = [
    "The three primary colors are",
    "def fibonacci(n):\n",
    "Once upon a time, in a small village by the sea,",
    "Question: What is the capital of France?\nAnswer:",
]


@pytest.fixture(scope="module")
def prompts(hf_smollm2_tokenizer) -> list[list[int]]:
    return [hf_smollm2_tokenizer(text)["input_ids"] for text in TEXTS]


def make_engine(smollm2_model, async_scheduling: bool, **settings) -> LLMEngine:
    model, model_config = smollm2_model
    settings.setdefault("max_model_len", 256)
    settings.setdefault("num_gpu_blocks_override", 80)
    config = EngineConfig(device="cpu", async_scheduling=async_scheduling, **settings)
    return LLMEngine.from_config(config, model=model, model_config=model_config)


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, tuple]:
    """Every request to its end: (tokens, finish_reason, stop_reason) by id."""
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    tokens: dict[str, list[int]] = {rid: [] for rid in requests}
    ends: dict[str, tuple] = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            assert output.request_id not in ends, f"{output.request_id} had an output after it finished"
            tokens[output.request_id].extend(output.new_token_ids)
            if output.finished:
                ends[output.request_id] = (output.finish_reason, output.stop_reason)
    return {rid: (tokens[rid], *ends[rid]) for rid in requests}


def assert_no_blocks_held(engine: LLMEngine) -> None:
    stats = engine.stats()
    assert stats.kv_cache_usage == 0.0
    assert stats.num_running == stats.num_waiting == 0
    assert engine.block_pool.num_free_blocks == engine.block_pool.num_blocks - 1  # the null block


def greedy(max_tokens: int, **extra) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **extra)


def test_ahead_steps_give_the_tokens_and_finish_reasons_of_one_step_at_a_time(smollm2_model, prompts):
    # different lengths, so requests leave the batch at different steps (by length)
    plain = {f"r{i}": (p, greedy(6 + 5 * i, ignore_eos=True)) for i, p in enumerate(prompts)}
    expected = run(make_engine(smollm2_model, False), plain)
    # a stop token that a request samples mid-way: the step launched after it runs in vain
    stop_at = expected["r2"][0][4]
    requests = dict(plain)
    requests["r2"] = (prompts[2], greedy(21, ignore_eos=True, stop_token_ids=[stop_at]))
    expected = run(make_engine(smollm2_model, False), requests)
    assert expected["r2"][1:] == ("stop", stop_at)

    engine = make_engine(smollm2_model, True)
    assert run(engine, requests) == expected
    assert engine.num_steps_ahead > 10
    assert_no_blocks_held(engine)
    assert engine.stats().num_generation_tokens == sum(len(t) for t, _, _ in expected.values())


def test_eos_stops_a_request_running_ahead(smollm2_model, hf_smollm2_tokenizer):
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    text = hf_smollm2_tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    prompt = hf_smollm2_tokenizer(text, add_special_tokens=False)["input_ids"]
    params = greedy(40)  # EOS allowed: the instruct model ends its short answer with it
    expected = run(make_engine(smollm2_model, False), {"q": (prompt, params)})
    assert expected["q"][1] == "stop" and 3 < len(expected["q"][0]) < 40
    engine = make_engine(smollm2_model, True)
    assert run(engine, {"q": (prompt, params)}) == expected
    assert engine.num_steps_ahead > 0
    assert_no_blocks_held(engine)


def test_requests_that_read_their_own_history_run_one_step_at_a_time(smollm2_model, prompts):
    requests = {
        "penalty": (prompts[0], greedy(10, repetition_penalty=1.3, ignore_eos=True)),
        "seed": (prompts[1], SamplingParams(max_tokens=10, temperature=0.8, seed=7, ignore_eos=True)),
        "logprobs": (prompts[2], greedy(10, logprobs=2, ignore_eos=True)),
        "min_tokens": (prompts[3], greedy(10, min_tokens=10)),
    }
    for rid, request in requests.items():
        expected = run(make_engine(smollm2_model, False), {rid: request})
        engine = make_engine(smollm2_model, True)
        assert run(engine, {rid: request}) == expected, rid
        if rid == "min_tokens":  # past its min_tokens it may run ahead
            assert engine.num_steps_ahead == 0 or expected[rid][0][9:] != []
        else:
            assert engine.num_steps_ahead == 0, rid


def test_a_request_added_while_a_step_runs_ahead_is_admitted_and_served(smollm2_model, prompts):
    first = greedy(12, ignore_eos=True)
    late = greedy(8, ignore_eos=True)

    def serve(engine: LLMEngine) -> dict[str, list[int]]:
        tokens: dict[str, list[int]] = {"a": [], "b": []}
        engine.add_request("a", prompts[0], first)
        for _ in range(4):
            for output in engine.step():
                tokens[output.request_id].extend(output.new_token_ids)
        engine.add_request("b", prompts[1], late)
        while engine.has_unfinished_requests():
            for output in engine.step():
                tokens[output.request_id].extend(output.new_token_ids)
        return tokens

    expected = serve(make_engine(smollm2_model, False))
    engine = make_engine(smollm2_model, True)
    assert serve(engine) == expected
    assert len(expected["a"]) == 12 and len(expected["b"]) == 8
    assert engine.num_steps_ahead > 0
    assert_no_blocks_held(engine)


def test_abort_while_a_step_runs_ahead_frees_its_blocks_and_spares_the_others(smollm2_model, prompts):
    params = greedy(14, ignore_eos=True)
    expected = run(make_engine(smollm2_model, False), {"keep": (prompts[1], params)})["keep"][0]

    engine = make_engine(smollm2_model, True)
    engine.add_request("keep", prompts[1], params)
    engine.add_request("drop", prompts[2], params)
    tokens: list[int] = []
    for _ in range(5):
        for output in engine.step():
            assert not output.finished
            if output.request_id == "keep":
                tokens.extend(output.new_token_ids)
    assert engine.num_steps_ahead > 0  # a step of both is in flight now
    aborted = engine.abort_request("drop")
    assert [(o.request_id, o.finish_reason) for o in aborted] == [("drop", "abort")]
    while engine.has_unfinished_requests():
        for output in engine.step():
            assert output.request_id == "keep"
            tokens.extend(output.new_token_ids)
    assert tokens == expected
    assert_no_blocks_held(engine)


def test_preemption_under_a_tight_cache_still_gives_the_same_tokens(smollm2_model, prompts):
    params = [greedy(30, ignore_eos=True) for _ in prompts]
    settings = {"max_model_len": 96, "num_gpu_blocks_override": 10}
    expected = make_engine(smollm2_model, False, **settings).generate(prompts, params)
    engine = make_engine(smollm2_model, True, **settings)
    assert engine.generate(prompts, params) == expected
    assert engine.stats().num_preemptions > 0
    assert engine.num_steps_ahead > 0


def test_async_scheduling_defaults_off_on_cpu_and_follows_the_flag(smollm2_model):
    assert make_engine(smollm2_model, None).async_scheduling is False  # no graphs to overlap
    assert make_engine(smollm2_model, True).async_scheduling is True
    parser = PdserveArgumentParser()
    add_engine_args(parser)
    assert engine_config_from_args(parser.parse_args([])).async_scheduling is None
    assert engine_config_from_args(parser.parse_args(["--async-scheduling"])).async_scheduling is True
    assert engine_config_from_args(parser.parse_args(["--no-async-scheduling"])).async_scheduling is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ahead_steps_on_cuda_graphs_equal_one_step_at_a_time(dtype):
    from tests.engine.test_cuda_graphs import tiny_config, tiny_model

    config = tiny_config(head_dim=64, max_positions=256)
    model = tiny_model(config, "cuda", dtype, std=0.05)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, config.vocab_size, (5 + 9 * i,), generator=generator).tolist() for i in range(5)]
    requests = {f"r{i}": (p, greedy(8 + 7 * i, ignore_eos=True)) for i, p in enumerate(prompts)}
    results = {}
    for flag in (False, True):
        settings = {"max_model_len": 256, "num_gpu_blocks_override": 80, "max_num_seqs": 8}
        engine = LLMEngine.from_config(
            EngineConfig(device="cuda", async_scheduling=flag, **settings), model=model, model_config=config
        )
        assert engine.runner.cuda_graphs is not None
        results[flag] = run(engine, requests)
        assert_no_blocks_held(engine)
        assert (engine.num_steps_ahead > 20) == flag
    assert results[True] == results[False]
