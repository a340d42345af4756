"""The whole system through the real `openai` client: `pdserve serve` on loopback (one
prefill worker, two decode workers, the router; the embedded model on CPU), plus a
second `pdserve router` in front of the same workers that prefills every prompt on the
decode workers. The first router sends every prompt to the prefill worker
(--local-prefill-threshold 0), so its answers cross prefill -> KV transfer -> decode.

Checked: chat, completions, streaming with the usage chunk, n=2, stop strings,
logprobs, /v1/models; the errors 400 (prompt over --max-model-len), 401, 404; greedy
tokens equal to the in-process LLMEngine's on both paths; a request sharing a long
prefix with an earlier one goes to the decode worker that holds it, which pulls only
the blocks it lacks; and SIGTERM stops every process."""

from __future__ import annotations

import time

import openai
import pytest

from common.sampling_params import SamplingParams
from tests.harness.stack import ServeStack, local_prefill_router, metric

API_KEY = "e2e-secret"
MAX_MODEL_LEN = 512
BLOCK_SIZE = 16
ENGINE_FLAGS = [
    "--dtype", "float32", "--quantization", "none", "--device", "cpu", "--max-model-len", str(MAX_MODEL_LEN),
    "--num-gpu-blocks-override", "128", "--block-size", str(BLOCK_SIZE),
]  # fmt: skip
MODEL = "SmolLM2-135M-Instruct"
PROMPTS = [
    "The three primary colors are red, yellow and blue. Mixing two of them gives",
    "def fibonacci(n):\n",
]
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def stack():
    serve = ServeStack(
        [
            *ENGINE_FLAGS,
            "--num-prefill-workers", "1",
            "--num-decode-workers", "2",
            "--api-key", API_KEY,
            "--local-prefill-threshold", "0",
            "--disable-uvicorn-access-log",
            # a CPU engine step can keep a worker silent for seconds on a busy machine
            "--worker-health-timeout", "30",
            # the earlier tests leave the two decode workers' routed work uneven, and the
            # balance check would then move a short shared prefix off its holder: that choice
            # is tested in tests/router, the cache-following path here
            "--routing-weights", '{"balance_threshold": 0}',
        ]
    )  # fmt: skip
    try:
        yield serve.ready()
    finally:
        serve.stop_checked()


@pytest.fixture(scope="module")
def local_router(stack):
    """A second router over the same workers that prefills every prompt on decode."""
    router = local_prefill_router(stack, MAX_MODEL_LEN)
    try:
        yield router.ready()
    finally:
        router.stop()


def _client(url: str, api_key: str = API_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=api_key, timeout=120, max_retries=0)


@pytest.fixture(scope="module")
def client(stack):
    return _client(stack.url)


@pytest.fixture(scope="module")
def tokenizer(smollm2_source):
    from common.tokenizer import load_tokenizer

    return load_tokenizer(smollm2_source)


@pytest.fixture(scope="module")
def engine(smollm2_model):
    from common.config.engine_config import EngineConfig
    from common.engine.llm_engine import LLMEngine

    model, model_config = smollm2_model
    config = EngineConfig(
        device="cpu", max_model_len=MAX_MODEL_LEN, num_gpu_blocks_override=128, block_size=BLOCK_SIZE
    )
    return LLMEngine.from_config(config, model=model, model_config=model_config)


def _greedy(engine, prompts: list[list[int]], max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    return engine.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0))


def _completion_tokens(
    client: openai.OpenAI, prompt: list[int], max_tokens: int = MAX_TOKENS, **extra: object
) -> list[int]:
    result = client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"return_token_ids": True, **extra},
    )
    return result.choices[0].token_ids  # type: ignore[attr-defined]


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_greedy_completions_equal_the_engine_on_both_prefill_paths(
    client, local_router, stack, engine, tokenizer
):
    prompts = [tokenizer.encode(text) for text in PROMPTS]
    expected = _greedy(engine, prompts)
    remote_before = metric(stack.url, "pdserve_router_prefill_decisions_total", decision="remote")
    for prompt, tokens in zip(prompts, expected, strict=True):
        assert _completion_tokens(client, prompt) == tokens
        assert _completion_tokens(_client(local_router.url), prompt) == tokens
    assert metric(
        stack.url, "pdserve_router_prefill_decisions_total", decision="remote"
    ) == remote_before + len(prompts)
    assert metric(stack.url, "pdserve_router_prefill_decisions_total", decision="fallback") == 0
    assert metric(local_router.url, "pdserve_router_prefill_decisions_total", decision="local") == len(
        prompts
    )


def test_greedy_chat_equals_the_engine_on_the_rendered_prompt(client, engine, tokenizer):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    result = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, temperature=0, extra_body={"return_token_ids": True}
    )
    prompt = result.prompt_token_ids  # type: ignore[attr-defined]
    assert prompt == tokenizer.encode(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False
    )
    (expected,) = _greedy(engine, [prompt], 12)
    choice = result.choices[0]
    assert choice.token_ids == expected  # type: ignore[attr-defined]
    assert choice.message.role == "assistant" and choice.message.content
    assert result.usage.prompt_tokens == len(prompt)
    assert result.usage.completion_tokens == len(expected)


def test_streaming_chat_ends_with_the_usage_chunk(client):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Name a color."}],
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    *text_chunks, last = chunks
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == 8 or text_chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in text_chunks)
    assert text_chunks[0].choices[0].delta.role == "assistant"
    assert text_chunks[-1].choices[0].finish_reason in ("stop", "length")
    text = "".join(c.choices[0].delta.content or "" for c in text_chunks)
    assert text


def test_n_2_samples_two_choices(client):
    result = client.completions.create(
        model=MODEL,
        prompt="Once upon a time",
        max_tokens=6,
        n=2,
        temperature=1.0,
        seed=7,
        extra_body={"return_token_ids": True},
    )
    assert sorted(c.index for c in result.choices) == [0, 1]
    assert all(c.finish_reason in ("stop", "length") for c in result.choices)
    assert result.usage.completion_tokens == sum(len(c.token_ids) for c in result.choices)  # type: ignore[attr-defined]


def test_a_stop_string_cuts_the_text(client, engine, tokenizer):
    prompt = "The three primary colors are red, yellow and blue. Mixing two of them gives"
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0).choices[0].text
    stop = full.strip().split()[1]  # a word from the middle of the greedy answer
    cut = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0, stop=[stop])
    choice = cut.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.text == full[: full.index(stop)]
    streamed = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=20, temperature=0, stop=[stop], stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == choice.text


def test_logprobs_of_chat_and_completions(client):
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hi."}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        # greedy: the sampled token is the most likely one
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-4)
    completion = client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=3, temperature=0, logprobs=1
    )
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 3
    assert "".join(logprobs.tokens) == completion.choices[0].text


def test_errors_400_401_404(stack, client):
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model=MODEL, prompt=" hello" * 600, max_tokens=5)
    assert f"maximum context length is {MAX_MODEL_LEN} tokens" in str(too_long.value)
    with pytest.raises(openai.AuthenticationError):
        _client(stack.url, api_key="wrong").models.list()
    with pytest.raises(openai.NotFoundError) as unknown:
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    assert "The model `no-such-model` does not exist." in str(unknown.value)


def test_a_shared_long_prefix_goes_to_the_decode_worker_holding_it(stack, client, tokenizer):
    """Request 1 leaves its prompt's blocks on one decode worker (pulled from the prefill
    worker, then cached and announced in KV events); request 2 shares a long prefix: the
    router sends it to that worker, and that worker pulls only the blocks it lacks."""
    prefix = "You are a careful assistant who answers questions about astronomy. " * 14
    first = tokenizer.encode(prefix + "How far away is the Moon?")
    second = tokenizer.encode(prefix + "Why is Mars red?")
    shared_blocks = len(tokenizer.encode(prefix)) // BLOCK_SIZE - 1
    assert shared_blocks >= 5
    decode = stack.addresses("decode")

    def routed() -> dict[str, float]:
        return {
            w: metric(stack.url, "pdserve_router_requests_routed_total", worker=w, role="decode")
            for w in decode
        }

    before = routed()
    _completion_tokens(client, first, max_tokens=3, ignore_eos=True)  # the decode worker must run
    after_first = routed()
    (holder,) = [w for w in decode if after_first[w] > before[w]]
    metrics_port = dict(stack.workers["decode"])[holder]
    worker_url = f"http://127.0.0.1:{metrics_port}"
    deadline = time.monotonic() + 30
    while metric(stack.url, "pdserve_router_prefix_index_blocks", worker=holder) < shared_blocks:
        assert time.monotonic() < deadline, "the router never indexed the holder's KV events"
        time.sleep(0.2)

    pulled_before = metric(worker_url, "vllm:nixl_num_descriptors_sum")
    overlap_before = metric(
        stack.url, "pdserve_router_prefix_overlap_blocks_by_worker_total", worker=holder, role="decode"
    )
    _completion_tokens(client, second, max_tokens=3, ignore_eos=True)
    after_second = routed()
    assert after_second[holder] == after_first[holder] + 1
    overlap = metric(
        stack.url, "pdserve_router_prefix_overlap_blocks_by_worker_total", worker=holder, role="decode"
    )
    assert overlap - overlap_before >= shared_blocks
    pulled = metric(worker_url, "vllm:nixl_num_descriptors_sum") - pulled_before
    assert 0 < pulled <= len(second) // BLOCK_SIZE + 1 - shared_blocks
