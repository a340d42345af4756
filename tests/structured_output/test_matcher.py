"""One matcher per sequence: tokens accepted atomically, rollback back to an earlier mask,
the end of a grammar seen, and the bitmask row written only where it fits."""

from __future__ import annotations

import pytest
import torch

from common.structured_output.matcher import (
    GrammarMatcher,
    allocate_bitmask,
    bitmask_width,
    fill_bitmasks,
)
from common.structured_output.spec import StructuredOutputSpec


def _allowed(bitmask: torch.Tensor, row: int, token: int) -> bool:
    return bool((int(bitmask[row, token // 32]) >> (token % 32)) & 1)


@pytest.fixture
def make(grammar_cache, grammar_tokenizer):
    def make(spec: StructuredOutputSpec) -> GrammarMatcher:
        return GrammarMatcher(grammar_cache.get(spec, grammar_tokenizer))

    return make


@pytest.fixture
def encode(smollm2_tokenizer):
    return lambda text: smollm2_tokenizer.encode(text, add_special_tokens=False)


def test_a_refused_token_list_leaves_the_matcher_where_it_was(make, encode, grammar_tokenizer):
    matcher = make(StructuredOutputSpec.from_params(choice=["hello world", "help"]))
    before = allocate_bitmask(1, grammar_tokenizer.vocab_size)
    matcher.fill_bitmask(before)
    assert not matcher.accept_tokens(encode("hello") + encode(" there"))
    after = allocate_bitmask(1, grammar_tokenizer.vocab_size)
    matcher.fill_bitmask(after)
    assert torch.equal(before, after)
    assert matcher.accept_tokens(encode("hello world"))


def test_rollback_returns_to_the_earlier_mask(make, encode, grammar_tokenizer):
    matcher = make(
        StructuredOutputSpec.from_params(json={"type": "object", "properties": {"a": {"type": "integer"}}})
    )
    start, later, back = (allocate_bitmask(1, grammar_tokenizer.vocab_size) for _ in range(3))
    matcher.fill_bitmask(start)
    tokens = encode('{"a": 1')
    assert matcher.accept_tokens(tokens)
    matcher.fill_bitmask(later)
    assert not torch.equal(start, later)
    matcher.rollback(len(tokens))
    matcher.fill_bitmask(back)
    assert torch.equal(start, back)
    with pytest.raises(ValueError, match="count of tokens >= 0"):
        matcher.rollback(-1)


def test_a_finished_grammar_is_terminated_and_takes_only_eos(
    make, encode, smollm2_tokenizer, grammar_tokenizer
):
    eos = smollm2_tokenizer.eos_token_id
    matcher = make(StructuredOutputSpec.from_params(choice=["yes", "no"]))
    assert not matcher.is_terminated() and not matcher.is_accepting()
    assert matcher.accept_tokens(encode("yes"))
    assert matcher.is_terminated() and matcher.is_accepting()
    bitmask = allocate_bitmask(1, grammar_tokenizer.vocab_size)
    matcher.fill_bitmask(bitmask)
    allowed = [t for t in range(grammar_tokenizer.vocab_size) if _allowed(bitmask, 0, t)]
    assert allowed == [eos]
    assert matcher.accept_token(eos)


def test_eos_is_refused_before_the_grammar_is_complete(make, encode, smollm2_tokenizer):
    matcher = make(StructuredOutputSpec("regex", "[0-9]{3}"))
    assert matcher.accept_tokens(encode("12"))
    assert not matcher.accept_token(smollm2_tokenizer.eos_token_id)
    assert matcher.accept_tokens(encode("3"))


def test_matchers_of_one_grammar_are_independent(make, encode, grammar_tokenizer):
    spec = StructuredOutputSpec("regex", "(ab|cd)+")
    first, second = make(spec), make(spec)
    assert first.accept_tokens(encode("ab"))
    masks = allocate_bitmask(2, grammar_tokenizer.vocab_size)
    first.fill_bitmask(masks, 0)
    second.fill_bitmask(masks, 1)
    assert not torch.equal(masks[0], masks[1])  # only the first may end here


def test_fill_bitmasks_writes_each_matcher_into_its_row(make, encode, grammar_tokenizer):
    spec = StructuredOutputSpec.from_params(choice=["alpha", "beta"])
    matchers = [make(spec) for _ in range(3)]
    assert matchers[1].accept_tokens(encode("alpha"))
    batch = allocate_bitmask(4, grammar_tokenizer.vocab_size)
    fill_bitmasks([(m, row) for row, m in zip([2, 0, 1], matchers, strict=True)], batch)
    for row, m in zip([2, 0, 1], matchers, strict=True):
        alone = allocate_bitmask(1, grammar_tokenizer.vocab_size)
        m.fill_bitmask(alone)
        assert torch.equal(batch[row], alone[0])
    assert bool((batch[3] == -1).all())  # a row no matcher owns is left as it was


@pytest.mark.parametrize(
    "bitmask",
    [
        torch.full((1, 10), -1, dtype=torch.int32),
        torch.zeros((1, 1536), dtype=torch.int64),
        torch.zeros((1536,), dtype=torch.int32),
        torch.zeros((1536, 2), dtype=torch.int32).t(),
    ],
    ids=["too narrow", "int64", "1-D", "not contiguous"],
)
def test_fill_refuses_a_bitmask_of_the_wrong_shape(make, bitmask):
    matcher = make(StructuredOutputSpec("regex", "a"))
    with pytest.raises(ValueError, match="bitmask"):
        matcher.fill_bitmask(bitmask)


def test_bitmask_width_rounds_up_to_whole_words():
    assert bitmask_width(49152) == 1536
    assert bitmask_width(49153) == 1537
    assert allocate_bitmask(3, 100).shape == (3, 4)


def test_a_structural_tag_constrains_only_what_follows_its_trigger(make, encode):
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    }
    spec = StructuredOutputSpec.from_params(
        structural_tag={
            "structures": [{"begin": "<function=get_weather>", "schema": schema, "end": "</function>"}],
            "triggers": ["<function="],
        }
    )
    assert make(spec).accept_tokens(encode("free text, no call"))
    assert make(spec).accept_tokens(
        encode('Checking. <function=get_weather>{"city": "Paris"}</function> done')
    )
    assert not make(spec).accept_tokens(encode('Checking. <function=get_weather>{"town": "Paris"}'))
