"""The sampler: each SamplingParams field changes the choice exactly as specified."""

from __future__ import annotations

import math

import pytest
import torch

from common.engine.request import Request
from common.engine.sampler import Sampler, process_logits
from common.sampling_params import SamplingParams

EOS = 2


def make_request(prompt=(10, 11), outputs=(), eos=EOS, **params) -> Request:
    request = Request("r", list(prompt), SamplingParams(**params), eos_token_id=eos)
    for token in outputs:
        request.append_output_token(token)
    return request


def random_logits(rows: int, vocab: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def sample_ids(sampler: Sampler, logits: torch.Tensor, requests) -> list[int]:
    return [s.token_id for s in sampler(logits, requests)]


def test_greedy_rows_take_the_argmax():
    logits = random_logits(8)
    requests = [make_request(temperature=0.0) for _ in range(8)]
    assert sample_ids(Sampler(), logits, requests) == logits.argmax(dim=-1).tolist()


def test_top_k_one_equals_greedy_at_any_temperature():
    logits = random_logits(16)
    requests = [make_request(temperature=1.5, top_k=1) for _ in range(16)]
    assert sample_ids(Sampler(), logits, requests) == logits.argmax(dim=-1).tolist()


def test_tiny_top_p_equals_greedy():
    logits = random_logits(16, seed=1)
    requests = [make_request(temperature=1.0, top_p=1e-6) for _ in range(16)]
    assert sample_ids(Sampler(), logits, requests) == logits.argmax(dim=-1).tolist()


def test_top_k_draws_only_from_the_k_most_likely():
    logits = random_logits(1, seed=2).expand(2000, -1).contiguous()
    requests = [make_request(temperature=2.0, top_k=3) for _ in range(2000)]
    drawn = set(sample_ids(Sampler(seed=5), logits, requests))
    assert drawn == set(logits[0].topk(3).indices.tolist())


def test_top_p_draws_only_from_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.04]])).expand(2000, -1).contiguous()
    requests = [make_request(temperature=1.0, top_p=0.75) for _ in range(2000)]
    # 0.5 alone is below 0.75; 0.5 + 0.3 reaches it: the nucleus is {0, 1}
    assert set(sample_ids(Sampler(seed=3), logits, requests)) == {0, 1}


def test_min_p_drops_tokens_below_the_fraction_of_the_top_probability():
    probs = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    logits = probs.log().unsqueeze(0).expand(2000, -1).contiguous()
    requests = [make_request(temperature=1.0, min_p=0.3) for _ in range(2000)]
    # threshold 0.3 * 0.4 = 0.12: tokens 0, 1 and 2 stay
    assert set(sample_ids(Sampler(seed=4), logits, requests)) == {0, 1, 2}


def test_temperature_sampling_follows_the_softmax():
    base = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 2.0])
    n = 6000
    logits = base.unsqueeze(0).expand(n, -1).contiguous()
    requests = [make_request(temperature=0.7) for _ in range(n)]
    counts = torch.bincount(torch.tensor(sample_ids(Sampler(seed=1234), logits, requests)), minlength=6)
    expected = torch.softmax(base / 0.7, dim=-1) * n
    chi_square = float(((counts - expected) ** 2 / expected).sum())
    # 5 degrees of freedom: p = 0.001 at 20.5; a wrong distribution lands in the hundreds
    assert chi_square < 25.0, (counts.tolist(), expected.tolist())


def test_seeded_request_is_reproducible_and_independent_of_its_batch():
    logits = random_logits(1, seed=7)
    seeded = make_request(temperature=1.0, seed=42)
    alone = sample_ids(Sampler(seed=0), logits, [seeded])[0]
    companions = [make_request(temperature=1.0) for _ in range(5)]
    batch_logits = torch.cat([random_logits(3, seed=8), logits, random_logits(2, seed=9)])
    in_batch = sample_ids(Sampler(seed=99), batch_logits, companions[:3] + [seeded] + companions[3:])[3]
    assert in_batch == alone


def test_seeded_draws_depend_on_the_output_count_not_on_history():
    logits = random_logits(1, vocab=1000, seed=10)
    draws = [
        sample_ids(Sampler(), logits, [make_request(temperature=1.0, seed=1, outputs=[5] * n)])[0]
        for n in range(8)
    ]
    assert len(set(draws)) > 1  # a fresh draw at every step, not the same one repeated
    # same seed and same number of outputs (as after a preemption that recomputes): same draw
    again = sample_ids(Sampler(seed=123), logits, [make_request(temperature=1.0, seed=1, outputs=[5] * 3)])
    assert again[0] == draws[3]


def test_unseeded_draws_follow_the_engine_seed():
    logits = random_logits(32, vocab=500, seed=11)
    requests = [make_request(temperature=1.0) for _ in range(32)]
    first = sample_ids(Sampler(seed=7), logits, requests)
    assert sample_ids(Sampler(seed=7), logits, requests) == first
    assert sample_ids(Sampler(seed=8), logits, requests) != first


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = torch.tensor([[4.0, -2.0, 3.0, -1.0, 1.0, 0.5]])
    request = make_request(prompt=[0, 1], outputs=[2], repetition_penalty=2.0)
    processed = process_logits(logits, [request])
    assert processed.tolist() == [[2.0, -4.0, 1.5, -1.0, 1.0, 0.5]]


def test_frequency_and_presence_penalties_count_output_tokens_only():
    logits = torch.zeros(1, 6)
    request = make_request(prompt=[0, 1], outputs=[3, 3, 5], frequency_penalty=0.5, presence_penalty=0.25)
    processed = process_logits(logits, [request])
    assert processed.tolist() == [[0.0, 0.0, 0.0, -1.25, 0.0, -0.75]]


def test_penalties_apply_only_to_the_rows_that_ask_for_them():
    logits = torch.ones(2, 4)
    plain = make_request(prompt=[0], outputs=[1])
    penalised = make_request(prompt=[0], outputs=[1], presence_penalty=1.0)
    assert process_logits(logits, [plain, penalised]).tolist() == [[1.0] * 4, [1.0, 0.0, 1.0, 1.0]]


def test_logit_bias_adds_to_the_named_tokens():
    logits = random_logits(2, vocab=10, seed=12)
    request = make_request(temperature=0.0, logit_bias={7: 100.0, 3: -5.0})
    processed = process_logits(logits, [make_request(), request])
    expected = logits.clone()
    expected[1, 7] += 100.0
    expected[1, 3] -= 5.0
    assert torch.equal(processed, expected)
    assert sample_ids(Sampler(), logits, [make_request(temperature=0.0), request])[1] == 7


def test_min_tokens_blocks_eos_and_stop_tokens_until_reached():
    logits = torch.tensor([[0.0, 0.0, 9.0, 0.0, 8.0, 5.0]])  # EOS (2) best, stop id 4 next
    early = make_request(temperature=0.0, min_tokens=2, stop_token_ids=[4], outputs=[1])
    assert sample_ids(Sampler(), logits, [early]) == [5]
    reached = make_request(temperature=0.0, min_tokens=2, stop_token_ids=[4], outputs=[1, 1])
    assert sample_ids(Sampler(), logits, [reached]) == [EOS]


def test_min_tokens_leaves_eos_alone_when_eos_is_ignored():
    logits = torch.tensor([[0.0, 0.0, 9.0, 0.0]])
    request = make_request(temperature=0.0, min_tokens=3, ignore_eos=True)
    assert sample_ids(Sampler(), logits, [request]) == [EOS]


def test_logprobs_are_the_raw_log_softmax_with_ranks_and_top_k():
    logits = random_logits(3, vocab=40, seed=13)
    requests = [
        make_request(temperature=0.0, logprobs=5, logit_bias={int(logits[0].argmax()): -100.0}),
        make_request(temperature=1.0, logprobs=0),
        make_request(temperature=0.0),
    ]
    sampled = Sampler(seed=3)(logits, requests)
    expected = torch.log_softmax(logits, dim=-1)
    for row in (0, 1):
        lp = sampled[row].logprobs
        token = sampled[row].token_id
        assert lp.token_id == token
        assert lp.logprob == pytest.approx(float(expected[row, token]), abs=1e-6)
        assert lp.rank == 1 + int((expected[row] > expected[row, token]).sum())
    top = sampled[0].logprobs.top
    assert [t for t, _ in top] == expected[0].topk(5).indices.tolist()
    assert [v for _, v in top] == pytest.approx(expected[0].topk(5).values.tolist(), abs=1e-6)
    # the bias moved the greedy choice off the raw argmax: the raw rank says so
    assert sampled[0].token_id != int(logits[0].argmax()) and sampled[0].logprobs.rank == 2
    assert sampled[1].logprobs.top == []
    assert sampled[2].logprobs is None


def test_probabilities_of_logprobs_sum_to_one_over_the_vocabulary():
    logits = random_logits(1, vocab=8, seed=14)
    sampled = Sampler()(logits, [make_request(temperature=0.0, logprobs=8)])
    assert math.fsum(math.exp(v) for _, v in sampled[0].logprobs.top) == pytest.approx(1.0, abs=1e-5)


def test_mixed_batch_keeps_each_row_its_own_params():
    logits = random_logits(4, vocab=30, seed=15)
    requests = [
        make_request(temperature=0.0),
        make_request(temperature=1.0, top_k=1),
        make_request(temperature=0.0, logit_bias={0: 100.0}),
        make_request(temperature=0.8, top_p=1e-6, min_p=0.5),
    ]
    ids = sample_ids(Sampler(), logits, requests)
    argmax = logits.argmax(dim=-1).tolist()
    assert ids == [argmax[0], argmax[1], 0, argmax[3]]


def test_the_callers_logits_are_not_modified():
    logits = random_logits(2, vocab=16, seed=16)
    before = logits.clone()
    Sampler()(logits, [make_request(repetition_penalty=2.0, logit_bias={1: 3.0}), make_request(min_tokens=1)])
    assert torch.equal(logits, before)
