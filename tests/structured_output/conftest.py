"""Shared by the structured-output tests: the embedded SmolLM2 tokenizer as the grammar
engine sees it (built once), and a masked walk that writes text under a constraint."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from common.structured_output.apply_bitmask import apply_token_bitmask_
from common.structured_output.grammar_cache import GrammarCache, GrammarTokenizer
from common.structured_output.matcher import GrammarMatcher, allocate_bitmask
from common.structured_output.spec import StructuredOutputSpec
from common.tokenizer import Tokenizer, load_tokenizer
from pdserve.bench.grammar import walk_bias


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_source) -> Tokenizer:
    return load_tokenizer(smollm2_source)


@pytest.fixture(scope="session")
def grammar_tokenizer(smollm2_tokenizer) -> GrammarTokenizer:
    return GrammarTokenizer.from_tokenizer(smollm2_tokenizer)


@pytest.fixture(scope="session")
def grammar_cache() -> GrammarCache:
    return GrammarCache(capacity=64)


@pytest.fixture(scope="session")
def closing_bias(smollm2_tokenizer) -> torch.Tensor:
    """Per-token pull towards finishing: random logits alone would rarely close a string
    (one allowed token in 49k ends it). Tokens that close a value go up, blank ones down."""
    return walk_bias(smollm2_tokenizer)


Walk = Callable[..., str]


@pytest.fixture(scope="session")
def masked_walk(smollm2_tokenizer, grammar_tokenizer, grammar_cache, closing_bias) -> Walk:
    """walk(spec, seed) → the text of a greedy walk over random logits (plus a growing
    pull to finish) under the spec's bitmask, until EOS or the grammar's end."""

    def walk(spec: StructuredOutputSpec, seed: int = 0, max_steps: int = 300) -> str:
        matcher = GrammarMatcher(grammar_cache.get(spec, grammar_tokenizer))
        bitmask = allocate_bitmask(1, grammar_tokenizer.vocab_size)
        rng = torch.Generator().manual_seed(seed)
        eos = set(smollm2_tokenizer.eos_token_ids)
        out: list[int] = []
        for step in range(max_steps):
            matcher.fill_bitmask(bitmask, 0)
            logits = torch.rand(1, grammar_tokenizer.vocab_size, generator=rng)
            logits += closing_bias * min(1.0, step / 16)
            apply_token_bitmask_(logits, bitmask)
            token = int(logits.argmax())
            assert matcher.accept_token(token), f"the matcher refused token {token} that its mask allowed"
            if token in eos:
                return smollm2_tokenizer.decode(out)
            out.append(token)
            if matcher.is_terminated():
                return smollm2_tokenizer.decode(out)
        raise AssertionError(f"no end after {max_steps} tokens: {smollm2_tokenizer.decode(out)!r}")

    return walk
