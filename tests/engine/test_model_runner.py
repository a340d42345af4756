"""The model runner: packing a step's inputs, the KV cache it owns, and what it samples.

A tiny random Llama keeps these tests fast; the real model runs in test_llm_engine.py.
"""

from __future__ import annotations

import pytest
import torch

from common.engine.model_runner import ModelRunner
from common.engine.request import Request
from common.engine.scheduled_batch import ScheduledBatch
from common.sampling_params import SamplingParams
from tests.tiny_llama import tiny_llama

BLOCK_SIZE = 4


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(max_position_embeddings=128)


def make_runner(tiny, num_blocks=32) -> ModelRunner:
    model, config = tiny
    return ModelRunner(
        model,
        config,
        num_blocks=num_blocks,
        block_size=BLOCK_SIZE,
        kv_cache_dtype="auto",
        device="cpu",
        dtype=torch.float32,
    )


def make_request(request_id: str, prompt: list[int], outputs=(), **params) -> Request:
    params.setdefault("temperature", 0.0)
    request = Request(request_id, prompt, SamplingParams(**params), eos_token_id=None)
    for token in outputs:
        request.append_output_token(token)
    return request


def step(runner: ModelRunner, requests, num_tokens, tables):
    """Run one step and advance the requests as the scheduler would."""
    sampled = runner.execute(ScheduledBatch(list(requests), list(num_tokens), [list(t) for t in tables]))
    for request, n in zip(requests, num_tokens, strict=True):
        request.num_computed_tokens += n
        if request.request_id in sampled:
            request.append_output_token(sampled[request.request_id].token_id)
    return sampled


def test_kv_cache_has_the_design_layout(tiny):
    runner = make_runner(tiny, num_blocks=7)
    assert runner.kv_cache.shape == (7, 2, 2, 2, BLOCK_SIZE, 8)
    assert runner.kv_cache.dtype == torch.float32


def test_prepare_inputs_packs_chunks_positions_and_slots(tiny):
    runner = make_runner(tiny)
    a = make_request("a", list(range(10)))  # a prefill chunk that ends the prompt
    a.num_computed_tokens = 4
    b = make_request("b", [20, 21, 22], outputs=[23, 24])  # a decode
    b.num_computed_tokens = 4
    c = make_request("c", list(range(30, 39)))  # a first chunk that stops mid-prompt
    batch = ScheduledBatch([a, b, c], [6, 1, 5], [[7, 2, 5], [3, 9], [1, 4, 8]])

    inputs = runner.prepare_inputs(batch)

    assert inputs.input_ids.tolist() == [4, 5, 6, 7, 8, 9, 24, 30, 31, 32, 33, 34]
    assert inputs.positions.tolist() == [4, 5, 6, 7, 8, 9, 4, 0, 1, 2, 3, 4]
    # a: positions 4-7 in its 2nd block (2), 8-9 in its 3rd (5); b: position 4 in block 9
    assert inputs.attn_metadata.slot_mapping.tolist() == [8, 9, 10, 11, 20, 21, 36, 4, 5, 6, 7, 16]
    meta = inputs.attn_metadata
    assert meta.query_start_loc.tolist() == [0, 6, 7, 12]
    assert meta.seq_lens.tolist() == [10, 5, 5]
    assert meta.query_lens_cpu == [6, 1, 5] and meta.seq_lens_cpu == [10, 5, 5]
    assert meta.max_query_len == 6 and meta.max_seq_len == 10
    assert meta.block_tables.tolist() == [[7, 2, 5], [3, 9, 0], [1, 4, 8]]
    # only a and b reach the end of their tokens; each samples from its last packed row
    assert inputs.sample_rows.tolist() == [5, 6]
    assert [r.request_id for r in inputs.sample_requests] == ["a", "b"]


def test_a_chunk_that_stops_mid_prompt_samples_nothing(tiny):
    runner = make_runner(tiny)
    request = make_request("r", list(range(12)))
    assert step(runner, [request], [5], [[0, 1, 2]]) == {}
    assert request.num_output_tokens == 0


def test_kv_is_written_only_into_the_requests_blocks(tiny):
    runner = make_runner(tiny, num_blocks=8)
    runner.kv_cache.zero_()
    step(runner, [make_request("r", list(range(7)))], [7], [[3, 5]])
    written = runner.kv_cache.flatten(1).any(dim=1).nonzero().flatten().tolist()
    assert written == [3, 5]
    # the 8th slot of the request (block 5, offset 3) is still empty
    assert not runner.kv_cache[5, :, :, :, 3].any()


def test_chunked_prefill_gives_the_logprobs_of_a_single_pass(tiny):
    prompt = [int(t) for t in torch.randint(0, 64, (13,), generator=torch.Generator().manual_seed(1))]
    tables = [[0, 1, 2, 3]]
    whole = make_request("w", prompt, logprobs=5)
    sampled_whole = step(make_runner(tiny), [whole], [13], tables)["w"]

    chunked = make_request("c", prompt, logprobs=5)
    runner = make_runner(tiny)
    for n in (5, 4, 4):
        sampled_chunked = step(runner, [chunked], [n], tables)
    sampled_chunked = sampled_chunked["c"]

    assert sampled_chunked.token_id == sampled_whole.token_id
    assert [t for t, _ in sampled_chunked.logprobs.top] == [t for t, _ in sampled_whole.logprobs.top]
    assert [v for _, v in sampled_chunked.logprobs.top] == pytest.approx(
        [v for _, v in sampled_whole.logprobs.top], abs=1e-4
    )


def test_decode_steps_match_recomputing_the_whole_sequence(tiny):
    prompt = [5, 17, 42, 8, 33, 2]
    tables = [[4, 9, 2, 6]]
    request = make_request("r", prompt)
    runner = make_runner(tiny)
    step(runner, [request], [len(prompt)], tables)
    for _ in range(7):
        step(runner, [request], [1], tables)
    generated = request.output_token_ids

    # each token again, from a fresh cache and the whole sequence before it
    for i in range(len(generated)):
        fresh = make_request("f", prompt + generated[:i])
        sampled = step(make_runner(tiny), [fresh], [fresh.num_tokens], [[0, 1, 2, 3]])
        assert sampled["f"].token_id == generated[i], f"token {i}"


def test_a_mixed_batch_samples_what_each_request_samples_alone(tiny):
    def decoding_request(runner):  # its prompt's K/V are already in block 5
        request = make_request("decode", [9, 8, 7], logprobs=3)
        step(runner, [request], [3], [[5]])
        return request

    def long_prompt():
        return make_request("long", list(range(1, 12)), logprobs=3)

    runner = make_runner(tiny)
    request = decoding_request(runner)
    alone_decode = step(runner, [request], [1], [[5]])["decode"]
    alone_long = step(make_runner(tiny), [long_prompt()], [11], [[0, 1, 2]])["long"]

    runner = make_runner(tiny)
    together = step(runner, [long_prompt(), decoding_request(runner)], [11, 1], [[0, 1, 2], [5]])

    for name, alone in (("decode", alone_decode), ("long", alone_long)):
        assert together[name].token_id == alone.token_id
        assert [v for _, v in together[name].logprobs.top] == pytest.approx(
            [v for _, v in alone.logprobs.top], abs=1e-5
        )


def test_whatever_the_cache_held_before_never_reaches_the_output(tiny):
    """The CPU cache is allocated unwritten: slots past a sequence's end may hold anything."""

    def generate(runner):
        request = make_request("r", [3, 1, 4, 1, 5, 9, 2], logprobs=3)
        for n in (4, 3, 1, 1, 1):  # chunked prefill, then decodes
            step(runner, [request], [n], [[6, 2, 5]])
        return request.output_token_ids

    clean = make_runner(tiny, num_blocks=8)
    clean.kv_cache.zero_()
    dirty = make_runner(tiny, num_blocks=8)
    dirty.kv_cache.fill_(float("nan"))
    assert generate(dirty) == generate(clean)
