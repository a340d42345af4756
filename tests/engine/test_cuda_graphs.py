"""CUDA-graph decode: which sizes are captured, how a step is padded to one, and on a GPU,
that replaying the graphs gives what eager steps give (and the CPU engine, in fp32).

The padding and input layout run on CPU (the runner builds the same layout there, without
graphs); the tests marked gpu need a CUDA device.
"""

from __future__ import annotations

import pytest
import torch

from common.attention.backend_select import get_attention_backend
from common.config.engine_config import EngineConfig
from common.engine.cuda_graphs import cuda_graph_sizes, padded_batch_size
from common.engine.llm_engine import LLMEngine
from common.engine.model_runner import ModelRunner
from common.engine.request import Request
from common.engine.scheduled_batch import ScheduledBatch
from common.models.config import ModelConfig
from common.models.llama import LlamaForCausalLM
from common.sampling_params import SamplingParams
from tests.tiny_llama import tiny_config as tiny_llama_config

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def tiny_config(head_dim: int = 8, max_positions: int = 128) -> ModelConfig:
    return tiny_llama_config(
        vocab_size=128,
        hidden_size=4 * head_dim,
        intermediate_size=8 * head_dim,
        head_dim=head_dim,
        max_position_embeddings=max_positions,
    )


def tiny_model(config: ModelConfig, device: str, dtype: torch.dtype, std: float = 0.3):
    """Random weights in `dtype` (RoPE tables stay fp32, as the loader builds them)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            backend = get_attention_backend(device, "auto", config.max_position_embeddings)
            model = LlamaForCausalLM(config, backend)
    finally:
        torch.set_default_dtype(previous)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:  # wide enough that greedy choices are far from ties
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model.eval()


def cpu_runner(config: ModelConfig, num_blocks: int = 8, **settings) -> ModelRunner:
    """A runner of a random tiny model on CPU, fp32, blocks of 4 tokens."""
    return ModelRunner(
        tiny_model(config, "cpu", torch.float32), config, num_blocks=num_blocks, block_size=4,
        kv_cache_dtype="auto", device="cpu", dtype=torch.float32, **settings,
    )  # fmt: skip


def decode_request(request_id: str, prompt: list[int], outputs: list[int]) -> Request:
    """A request whose prompt and all outputs but the last are in the cache."""
    request = Request(request_id, prompt, SamplingParams(temperature=0.0))
    for token in outputs:
        request.append_output_token(token)
    request.num_computed_tokens = request.num_tokens - 1
    return request


# -- which sizes, and padding ------------------------------------------------------------


def test_capture_sizes_step_like_vllm_and_end_at_the_sequence_limit():
    assert cuda_graph_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert cuda_graph_sizes(5) == [1, 2, 4, 5]
    assert cuda_graph_sizes(1) == [1]
    sizes = cuda_graph_sizes(1000)
    assert sizes[-1] == 512 and sizes[sizes.index(256) + 1] == 272
    assert sizes == sorted(set(sizes))


def test_a_sequence_limit_below_one_is_refused():
    with pytest.raises(ValueError, match="max_num_seqs"):
        cuda_graph_sizes(0)


def test_a_batch_pads_to_the_next_captured_size():
    sizes = [1, 2, 4, 8, 16]
    assert [padded_batch_size(n, sizes) for n in (1, 2, 3, 4, 5, 9, 16)] == [1, 2, 4, 4, 8, 16, 16]
    assert padded_batch_size(17, sizes) is None


def test_a_padded_decode_step_has_the_graph_layout():
    config = tiny_config(max_positions=100)
    runner = cpu_runner(config, num_blocks=32, max_model_len=50)
    a = decode_request("a", [5, 6, 7, 8, 9], [10])  # position 5 in its 2nd block (3)
    b = decode_request("b", [11, 12], [13, 14])  # position 3 in its 1st block (7)
    c = Request("c", list(range(20, 29)), SamplingParams())  # a 1-token chunk mid-prompt
    c.num_computed_tokens = 4
    batch = ScheduledBatch([a, b, c], [1, 1, 1], [[2, 3], [7], [9, 1, 4]])

    inputs = runner.prepare_inputs(batch, pad_to=8)

    assert inputs.num_reqs == 3
    assert inputs.input_ids.tolist() == [10, 14, 24, 0, 0, 0, 0, 0]
    assert inputs.positions.tolist() == [5, 3, 4, 0, 0, 0, 0, 0]
    # padding rows store nothing and attend to nothing
    assert inputs.attn_metadata.slot_mapping.tolist() == [13, 31, 4, -1, -1, -1, -1, -1]
    assert inputs.attn_metadata.seq_lens.tolist() == [6, 4, 5, 0, 0, 0, 0, 0]
    assert inputs.attn_metadata.query_start_loc.tolist() == list(range(9))
    # block tables as wide as max_model_len needs (50 / 4 -> 13 blocks), whatever this step holds
    tables = inputs.attn_metadata.block_tables
    assert tables.shape == (8, 13)
    assert tables[0, :2].tolist() == [2, 3] and tables[2, :3].tolist() == [9, 1, 4]
    # c stops mid-prompt: only a and b sample, from their own rows
    assert inputs.sample_rows.tolist() == [0, 1]
    assert [r.request_id for r in inputs.sample_requests] == ["a", "b"]


def test_only_a_pure_decode_batch_that_fits_may_be_padded():
    config = tiny_config()
    runner = cpu_runner(config)
    prefill = ScheduledBatch([Request("p", [1, 2, 3], SamplingParams())], [3], [[1]])
    with pytest.raises(ValueError, match="pure decode"):
        runner.prepare_inputs(prefill, pad_to=4)
    decodes = [decode_request(str(i), [1, 2], [3]) for i in range(3)]
    with pytest.raises(ValueError, match="at most 2"):
        runner.prepare_inputs(ScheduledBatch(decodes, [1, 1, 1], [[1], [2], [3]]), pad_to=2)


def test_padding_changes_neither_the_real_rows_nor_the_cache():
    config = tiny_config()
    model = tiny_model(config, "cpu", torch.float32)

    def run(pad_to):
        runner = ModelRunner(
            model, config, num_blocks=16, block_size=4, kv_cache_dtype="auto", device="cpu",
            dtype=torch.float32,
        )  # fmt: skip
        runner.kv_cache.zero_()
        prompts = {"a": [3, 1, 4, 1, 5], "b": [9, 2, 6], "c": [5, 3, 5, 8, 9, 7, 9]}
        tables = {"a": [2, 5], "b": [7], "c": [1, 3]}
        requests = [Request(rid, p, SamplingParams()) for rid, p in prompts.items()]
        runner.execute(ScheduledBatch(requests, [len(p) for p in prompts.values()], list(tables.values())))
        for r in requests:
            r.num_computed_tokens = r.num_tokens
            r.append_output_token(r.num_tokens)  # any token: one decode step of each
        batch = ScheduledBatch(requests, [1, 1, 1], list(tables.values()))
        with torch.inference_mode():
            inputs = runner.prepare_inputs(batch, pad_to=pad_to)
            hidden = model(inputs.input_ids, inputs.positions, runner.kv_cache, inputs.attn_metadata)
            logits = model.compute_logits(hidden[: inputs.num_reqs])
        return logits, runner.kv_cache.clone()

    plain_logits, plain_cache = run(None)
    padded_logits, padded_cache = run(8)
    torch.testing.assert_close(padded_logits, plain_logits, rtol=1e-5, atol=1e-5)
    # the same slots written, with the same values up to the rounding of a wider matmul;
    # slot -1 rows stored nothing
    assert torch.equal(padded_cache != 0, plain_cache != 0)
    torch.testing.assert_close(padded_cache, plain_cache, rtol=1e-5, atol=1e-5)
    assert not padded_cache[0].any()  # the null block stays empty


def test_step_buffers_are_reused_across_steps():
    config = tiny_config()
    runner = cpu_runner(config)
    first = runner.prepare_inputs(ScheduledBatch([decode_request("a", [1, 2], [3])], [1], [[1]]))
    second = runner.prepare_inputs(
        ScheduledBatch([decode_request("b", [4], [5]), decode_request("c", [6], [7])], [1, 1], [[2], [3]])
    )
    assert second.input_ids.data_ptr() == first.input_ids.data_ptr()
    assert second.attn_metadata.slot_mapping.data_ptr() == first.attn_metadata.slot_mapping.data_ptr()
    assert second.input_ids.tolist() == [5, 7]


def test_the_cpu_path_never_captures_graphs():
    config = tiny_config()
    runner = cpu_runner(config, enforce_eager=False)
    assert runner.cuda_graphs is None
    batch = ScheduledBatch([decode_request("a", [1, 2], [3])], [1], [[1]])
    assert runner.graph_size_for(batch) is None
    with pytest.raises(ValueError, match="CUDA device"):
        runner.capture_cuda_graphs([1])


# -- on a GPU ------------------------------------------------------------------------------


def decode_steps(
    runner: ModelRunner, prompts: list[list[int]], forced: list[list[int]] | None, num_tokens: int
):
    """Prefill every prompt in one step, then decode; each step's (token, top logprobs) per
    request. With `forced`, those tokens are fed back instead of the sampled ones, so two
    runners see the same inputs at every step however their samples differ."""
    requests = [
        Request(str(i), p, SamplingParams(temperature=0.0, logprobs=2)) for i, p in enumerate(prompts)
    ]
    blocks_each = -(-(max(map(len, prompts)) + num_tokens) // runner.block_size)
    tables = [list(range(1 + i * blocks_each, 1 + (i + 1) * blocks_each)) for i in range(len(prompts))]
    steps = []
    scheduled = [len(p) for p in prompts]
    for step in range(num_tokens):
        sampled = runner.execute(ScheduledBatch(requests, scheduled, tables))
        steps.append([(sampled[r.request_id].token_id, sampled[r.request_id].logprobs.top) for r in requests])
        for i, (r, n) in enumerate(zip(requests, scheduled, strict=True)):
            r.num_computed_tokens += n
            r.append_output_token(forced[i][step] if forced else sampled[r.request_id].token_id)
        scheduled = [1] * len(requests)
    return steps


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
@pytest.mark.parametrize("num_prompts", [3, 4])  # padded to 4, and exactly 4
def test_graph_replays_give_what_eager_steps_give(dtype, kv_cache_dtype, num_prompts):
    config = tiny_config(head_dim=64, max_positions=256)
    model = tiny_model(config, "cuda", dtype, std=0.1)
    prompts = [[(7 * i + 3 * j) % 128 for j in range(5 + 6 * i)] for i in range(num_prompts)]

    def runner(enforce_eager):
        runner = ModelRunner(
            model, config, num_blocks=64, block_size=16, kv_cache_dtype=kv_cache_dtype, device="cuda",
            dtype=dtype, max_num_seqs=8, enforce_eager=enforce_eager,
        )  # fmt: skip
        assert (runner.cuda_graphs is None) == enforce_eager
        return runner

    eager = decode_steps(runner(True), prompts, None, 12)
    tokens = [[step[i][0] for step in eager] for i in range(num_prompts)]
    graph = decode_steps(runner(False), prompts, tokens, 12)
    for eager_step, graph_step in zip(eager, graph, strict=True):
        for (eager_token, eager_top), (graph_token, graph_top) in zip(eager_step, graph_step, strict=True):
            eager_values = [v for _, v in eager_top]
            torch.testing.assert_close([v for _, v in graph_top], eager_values, rtol=0, atol=0.05)
            if eager_values[0] - eager_values[1] > 0.1:  # not a near tie: the same choice
                assert graph_token == eager_token


@pytest.mark.gpu
@requires_cuda
def test_a_graph_step_writes_only_its_real_rows_into_the_cache():
    config = tiny_config(head_dim=64, max_positions=256)
    model = tiny_model(config, "cuda", torch.bfloat16, std=0.1)
    runner = ModelRunner(
        model, config, num_blocks=16, block_size=16, kv_cache_dtype="auto", device="cuda",
        dtype=torch.bfloat16, max_num_seqs=8,
    )  # fmt: skip
    requests = [decode_request(str(i), [1 + i, 2, 3], [4]) for i in range(3)]
    tables = [[3], [7], [11]]
    assert runner.graph_size_for(ScheduledBatch(requests, [1, 1, 1], tables)) == 4
    before = runner.kv_cache.clone()
    runner.execute(ScheduledBatch(requests, [1, 1, 1], tables))
    changed = (runner.kv_cache != before).flatten(1).any(dim=1).nonzero().flatten().tolist()
    assert changed == [3, 7, 11]
    # each request's position 3 only
    diff = (runner.kv_cache != before)[[3, 7, 11]].any(dim=(1, 2, 3, 5))
    assert diff.nonzero()[:, 1].tolist() == [3, 3, 3]


@pytest.mark.gpu
@requires_cuda
def test_the_engine_captures_graphs_unless_told_to_stay_eager(smollm2_source):
    from common.models.loader import load_model

    model, model_config = load_model(
        smollm2_source, dtype="bfloat16", device="cuda",
        attn_backend=get_attention_backend("cuda", "auto", 256),
    )  # fmt: skip

    def engine(**settings):
        return LLMEngine.from_config(
            EngineConfig(
                device="cuda", max_model_len=256, max_num_seqs=24, kv_cache_memory_bytes=2**28, **settings
            ),
            model=model,
            model_config=model_config,
        )

    assert engine().runner.cuda_graphs.sizes == [1, 2, 4, 8, 16, 24]
    assert engine(enforce_eager=True).runner.cuda_graphs is None


GREEDY_TEXTS = [
    "The capital of France is",
    "def fibonacci(n):\n",
    "Once upon a time, in a small village by the sea,",
]


@pytest.mark.gpu
@requires_cuda
def test_default_model_in_fp32_on_the_gpu_gives_the_cpu_engines_greedy_tokens(smollm2_source, smollm2_model):
    from common.models.loader import load_model
    from common.tokenizer.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(smollm2_source)
    prompts = [tokenizer.encode(t) for t in GREEDY_TEXTS]
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    settings = dict(max_model_len=256, max_num_seqs=8, kv_cache_memory_bytes=2**28, dtype="float32")

    cpu_model, cpu_config = smollm2_model
    cpu = LLMEngine.from_config(
        EngineConfig(device="cpu", **settings), model=cpu_model, model_config=cpu_config
    )
    expected = cpu.generate(prompts, params)

    gpu_model, gpu_config = load_model(
        smollm2_source, dtype="float32", device="cuda",
        attn_backend=get_attention_backend("cuda", "auto", 256),
    )  # fmt: skip
    for enforce_eager in (False, True):
        gpu = LLMEngine.from_config(
            EngineConfig(device="cuda", enforce_eager=enforce_eager, **settings),
            model=gpu_model,
            model_config=gpu_config,
        )
        assert (gpu.runner.cuda_graphs is None) == enforce_eager
        assert gpu.generate(prompts, params) == expected, f"enforce_eager={enforce_eager}"
