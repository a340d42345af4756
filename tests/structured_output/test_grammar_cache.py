"""The per-worker grammar cache: one compile per (spec, tokenizer), least recently used
out first, the backend flag's values, and logits wider than the vocabulary."""

from __future__ import annotations

import pytest

from common.structured_output.grammar_cache import GrammarCache, GrammarTokenizer, resolve_backend
from common.structured_output.matcher import GrammarMatcher, allocate_bitmask
from common.structured_output.spec import StructuredOutputSpec


def _regex(pattern: str) -> StructuredOutputSpec:
    return StructuredOutputSpec("regex", pattern)


def test_the_same_spec_compiles_once(grammar_tokenizer):
    cache = GrammarCache(capacity=4)
    first = cache.get(_regex("a+"), grammar_tokenizer)
    assert cache.get(_regex("a+"), grammar_tokenizer) is first
    assert (cache.hits, cache.misses, len(cache)) == (1, 1, 1)


def test_options_and_tokenizer_are_part_of_the_key(grammar_tokenizer, smollm2_tokenizer):
    cache = GrammarCache(capacity=8)
    spec = StructuredOutputSpec.from_params(json={"type": "object"})
    compact = StructuredOutputSpec.from_params(json={"type": "object"}, disable_any_whitespace=True)
    wider = GrammarTokenizer.from_tokenizer(smollm2_tokenizer, vocab_size=grammar_tokenizer.vocab_size + 64)
    assert wider.tokenizer_id != grammar_tokenizer.tokenizer_id
    compiled = {id(cache.get(s, t)) for s in (spec, compact) for t in (grammar_tokenizer, wider)}
    assert len(compiled) == 4 and cache.misses == 4


def test_the_least_recently_used_grammar_is_evicted(grammar_tokenizer):
    cache = GrammarCache(capacity=2)
    a = cache.get(_regex("a"), grammar_tokenizer)
    cache.get(_regex("b"), grammar_tokenizer)
    assert cache.get(_regex("a"), grammar_tokenizer) is a  # "a" is now the most recent
    cache.get(_regex("c"), grammar_tokenizer)  # evicts "b"
    assert len(cache) == 2
    misses = cache.misses
    assert cache.get(_regex("a"), grammar_tokenizer) is a
    cache.get(_regex("b"), grammar_tokenizer)
    assert cache.misses == misses + 1


def test_a_spec_that_does_not_compile_raises_and_is_not_cached(grammar_tokenizer):
    cache = GrammarCache()
    with pytest.raises(ValueError, match="invalid regex"):
        cache.get(_regex("a(b"), grammar_tokenizer)
    assert len(cache) == 0


def test_backend_values():
    assert resolve_backend("auto") == resolve_backend("guidance") == "guidance"
    with pytest.raises(ValueError, match="'xgrammar' is not available here; use auto or guidance"):
        GrammarCache(backend="xgrammar")
    with pytest.raises(ValueError, match="unknown structured outputs backend 'fast'"):
        resolve_backend("fast")
    with pytest.raises(ValueError, match="capacity must be at least 1"):
        GrammarCache(capacity=0)


def test_ids_past_the_vocabulary_are_never_allowed(smollm2_tokenizer):
    padded = GrammarTokenizer.from_tokenizer(smollm2_tokenizer, vocab_size=smollm2_tokenizer.vocab_size + 100)
    matcher = GrammarMatcher(GrammarCache().get(StructuredOutputSpec("json_object"), padded))
    bitmask = allocate_bitmask(1, padded.vocab_size)
    matcher.fill_bitmask(bitmask)
    for token in range(smollm2_tokenizer.vocab_size, padded.vocab_size):
        assert not (int(bitmask[0, token // 32]) >> (token % 32)) & 1
    with pytest.raises(ValueError, match="smaller than the tokenizer's"):
        GrammarTokenizer.from_tokenizer(smollm2_tokenizer, vocab_size=100)
