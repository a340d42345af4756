"""The warm-up (common/engine/warmup.py): its plan stays inside what the scheduler could
build and reaches every kernel variant the step sizes select, and running it leaves the
engine exactly as it was: the same free blocks in the same order, no cached prefix, no KV
event, no counted step or token, and the same tokens afterwards, greedy or drawn.
On a GPU: after the warm-up, a varied workload compiles no Triton kernel."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Hashable

import pytest
import torch

from common.config.engine_config import EngineConfig
from common.config.kv_events_config import KVEventsConfig
from common.engine.engine_setup import resolve_warmup
from common.engine.llm_engine import LLMEngine
from common.engine.warmup import (
    KernelFirstUses,
    StepLimits,
    WarmupStep,
    plan_warmup,
    sampling_paths,
    warm_up,
)
from common.sampling_params import SamplingParams

SETTINGS = dict(
    device="cpu",
    max_model_len=128,
    num_gpu_blocks_override=48,
    max_num_batched_tokens=64,
    max_num_seqs=6,
    kv_events_config=KVEventsConfig(enable_kv_cache_events=True),
)
PROMPTS = [[(7 * i + j) % 64 for j in range(n)] for i, n in enumerate((5, 17, 40, 3))]


def make_engine(tiny, **overrides) -> LLMEngine:
    model, model_config = tiny
    return LLMEngine.from_config(
        EngineConfig(**{**SETTINGS, **overrides}), model=model, model_config=model_config
    )


def free_order(engine: LLMEngine) -> list[int]:
    """The free blocks in the order the pool hands them out (takes them all)."""
    pool = engine.block_pool
    return [b.block_id for b in pool.get_new_blocks(pool.num_free_blocks)]


def generate_all(engine: LLMEngine) -> list[list[int]]:
    """Greedy, seeded and unseeded draws: the last depend on the engine's random generator."""
    params = [
        SamplingParams(max_tokens=8, temperature=0.0),
        SamplingParams(max_tokens=8, temperature=1.0, seed=3),
        SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9),
        SamplingParams(max_tokens=8, temperature=1.0),
    ]
    return engine.generate(PROMPTS, params)


def test_warm_up_leaves_the_engine_as_it_was_and_its_tokens_the_same(tiny):
    warmed, untouched = make_engine(tiny), make_engine(tiny)
    report = warm_up(warmed)

    assert {s.kind for s in report.steps} >= {"prefill", "peak", "mixed", "decode"}
    assert warmed.take_kv_events() == []
    assert warmed.block_pool.num_cached_blocks == 0
    assert warmed.block_pool.num_free_blocks == warmed.block_pool.num_usable_blocks
    assert not warmed.has_unfinished_requests() and not warmed.scheduler.requests
    stats = warmed.stats()
    assert (stats.num_prompt_tokens, stats.num_generation_tokens, stats.num_steps) == (0, 0, 0)
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits, stats.num_preemptions) == (0, 0, 0)

    assert generate_all(warmed) == generate_all(untouched)
    # the same events (the prefix cache filled alike) and the same free queue afterwards
    assert warmed.take_kv_events() == untouched.take_kv_events()
    assert free_order(warmed) == free_order(untouched)


def test_warm_up_runs_on_the_embedded_model(smollm2_model):
    model, model_config = smollm2_model
    settings = {**SETTINGS, "kv_events_config": None, "max_num_seqs": 4, "max_num_batched_tokens": 48}
    engine = LLMEngine.from_config(EngineConfig(**settings), model=model, model_config=model_config)
    before = engine.generate(PROMPTS[:2], SamplingParams(max_tokens=6, temperature=0.0))
    steps = engine.num_steps
    report = warm_up(engine)
    assert report.kernel_variants is None  # nothing compiles on CPU, nothing is counted
    assert engine.num_steps == steps
    assert engine.generate(PROMPTS[:2], SamplingParams(max_tokens=6, temperature=0.0)) == before


def test_warm_up_refuses_an_engine_that_is_serving(tiny):
    engine = make_engine(tiny)
    engine.add_request("r", PROMPTS[0], SamplingParams(max_tokens=4))
    with pytest.raises(RuntimeError, match="idle engine"):
        warm_up(engine)


@pytest.mark.parametrize(("device", "flag", "expected"), [
    ("cuda", None, True), ("cpu", None, False), ("cpu", True, True), ("cuda", False, False),
])  # fmt: skip
def test_warmup_is_on_by_default_only_where_kernels_compile(device, flag, expected):
    assert resolve_warmup(EngineConfig(device=device, warmup=flag)) is expected


def test_the_warmup_flag_reaches_the_engine_config():
    from tests.cli.test_engine_args import engine_config_from_args, parse

    assert parse().warmup is None
    assert engine_config_from_args(parse("--no-warmup")).warmup is False
    assert engine_config_from_args(parse("--warmup")).warmup is True


# -- the plan ------------------------------------------------------------------------------

LIMITS = StepLimits(max_num_batched_tokens=1024, max_num_seqs=32, max_row_tokens=600, block_size=16)


class TwoConfigs:
    """A kernel that tiles 16 query tokens under 200 tokens a step and 32 from there, and
    splits decode in 4 up to 5 sequences, in 1 beyond."""

    def prefill_tiling(self, num_tokens: int) -> tuple[Hashable, int]:
        return ("small", 16) if num_tokens < 200 else ("large", 32)

    def decode_splits(self, batch_size: int) -> Hashable:
        return 4 if batch_size <= 5 else 1


def int_class(n: int) -> int:
    return 1 if n == 1 else 16 if n % 16 == 0 else 0


def prefill_variant(step: WarmupStep, kernels: TwoConfigs, block_size: int) -> tuple:
    config, tile = kernels.prefill_tiling(step.num_tokens)
    width = -(-step.max_length // block_size)
    return config, int_class(-(-step.max_query // tile)), int_class(width)


def check_within(steps: list[WarmupStep], limits: StepLimits) -> None:
    for step in steps:
        assert 1 <= len(step.rows) <= limits.max_num_seqs, step
        assert step.num_tokens <= limits.max_num_batched_tokens, step
        assert all(row.query >= 1 and row.context >= 0 for row in step.rows), step
        assert step.max_length <= limits.max_row_tokens, step


def test_the_plan_stays_within_what_the_scheduler_could_build():
    for limits in (LIMITS, dataclasses.replace(LIMITS, max_num_seqs=2, max_num_batched_tokens=40)):
        check_within(plan_warmup(limits, TwoConfigs()), limits)


def test_the_plan_reaches_every_prefill_variant_that_fits():
    kernels = TwoConfigs()
    steps = plan_warmup(LIMITS, kernels)
    prefill = [s for s in steps if s.max_query > 1]
    reached = {prefill_variant(s, kernels, LIMITS.block_size) for s in prefill}
    # every (config, tile-count class, width class) some step of at most 32 rows, 1024 tokens
    # and 600 tokens a sequence can launch, found by trying every such longest query and width
    possible = set()
    for query in range(2, LIMITS.max_row_tokens + 1):
        for width in range(-(-query // 16), -(-LIMITS.max_row_tokens // 16) + 1):
            for tokens in (query, 199, 200, min(1024, 32 * query)):
                if query <= tokens <= min(1024, 32 * query):
                    config, tile = kernels.prefill_tiling(tokens)
                    possible.add((config, int_class(-(-query // tile)), int_class(width)))
    assert reached == possible
    assert ("large", 16, 16) in reached  # a query of 16 tiles, in a sequence of 16 blocks
    planned = [prefill_variant(s, kernels, LIMITS.block_size) for s in steps if s.kind == "prefill"]
    assert len(planned) == len(set(planned))  # one step a variant


def test_the_plan_runs_the_largest_step_a_mixed_one_and_each_decode_size_once():
    steps = plan_warmup(dataclasses.replace(LIMITS, graph_sizes=(1, 2, 4, 8)), TwoConfigs())
    (peak,) = [s for s in steps if s.kind == "peak"]
    assert peak.num_tokens == 1024 and peak.max_length == 600
    (mixed,) = [s for s in steps if s.kind == "mixed"]
    assert min(r.query for r in mixed.rows) == 1 and mixed.max_query > 1
    assert [len(s.rows) for s in steps if s.kind == "graph"] == [1, 2, 4, 8]
    eager = [s for s in steps if s.kind == "decode"]
    # above the graphs: 9 (the first size there, of split count 1), 16 rows (the small-M
    # matmul's class) and the largest, each at widths 1, 2 and 16 blocks
    assert sorted({len(s.rows) for s in eager}) == [9, 16, 32]
    assert {-(-s.max_length // 16) for s in eager} == {1, 2, 16}


def test_without_graphs_every_decode_size_class_runs_eagerly():
    steps = plan_warmup(LIMITS, TwoConfigs())
    sizes = sorted({len(s.rows) for s in steps if s.kind == "decode"})
    assert sizes == [1, 2, 6, 16, 32]  # 1 and 6 start a split count; 1, 2 and 16 rows; the largest


def test_every_sampling_path_is_valid():
    for params in sampling_paths(vocab_size=64, max_logprobs=20):
        params.validate(64, 20)


# -- on a GPU ------------------------------------------------------------------------------


def llama_8b_layers(folder, num_layers: int) -> str:
    """A model folder of Llama-3-8B's shapes with few layers, for --load-format dummy: the same
    kernel variants as the whole model, a fraction of the memory."""
    import json

    from common.models.configs import bundled_config

    config = json.loads(bundled_config("llama-3-8b").read_text())
    config["num_hidden_layers"] = num_layers
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def busy_workload(engine: LLMEngine, seed: int) -> None:
    """Waves of prompts of random lengths and sampling, arriving while others decode."""
    rng = random.Random(seed)
    paths = sampling_paths(engine.vocab_size, engine.max_logprobs)
    n = 0
    for wave in (1, 3, 8, 40, 64):
        for _ in range(wave):
            length = rng.choice([rng.randint(1, 40), rng.randint(1, 600), rng.randint(1, 3500)])
            params = dataclasses.replace(rng.choice(paths), max_tokens=rng.randint(1, 24))
            prompt = [rng.randrange(engine.vocab_size) for _ in range(length)]
            engine.add_request(f"busy-{n}", prompt, params)
            n += 1
            if rng.random() < 0.3:
                engine.step()  # arrivals mid-stream: mixed steps
        while engine.has_unfinished_requests():
            engine.step()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("enforce_eager", [False, True], ids=["graphs", "eager"])
def test_after_the_warm_up_a_busy_workload_compiles_no_kernel(tmp_path, enforce_eager):
    config = EngineConfig(
        model=llama_8b_layers(tmp_path, 2), load_format="dummy", dtype="bfloat16", device="cuda",
        max_model_len=4096, num_gpu_blocks_override=2048, max_num_seqs=64, enforce_eager=enforce_eager,
    )  # fmt: skip
    engine = LLMEngine.from_config(config)
    report = warm_up(engine)
    print(report.summary())
    assert report.kernel_variants is not None
    late = KernelFirstUses(log_each=True)
    assert late.install()
    try:
        busy_workload(engine, seed=0)
    finally:
        late.uninstall()
    assert late.count == 0, f"{late.count} kernel variants compiled after the warm-up (logged above)"
