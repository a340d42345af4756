"""Compiled grammars, cached per worker: a bounded LRU keyed by (spec, tokenizer id).

Compiling binds a grammar to the tokenizer's vocabulary (the engine walks the token
trie against the grammar's lexer), which costs far more than a step; many requests
share a handful of schemas, so a worker compiles each once and gives every sequence a
cheap copy (matcher.py). The engine's view of the tokenizer is built once per tokenizer.

`backend` follows --structured-outputs-config.backend: "auto" and "guidance"
(llguidance) are shipped; vLLM's other names are refused with what to use instead.
Torch-free.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import llguidance

from common.structured_output.spec import StructuredOutputSpec
from common.structured_output.validate import validate_spec
from common.tokenizer.tokenizer import Tokenizer

BACKENDS = ("auto", "guidance")
_NOT_SHIPPED = ("xgrammar", "outlines", "lm-format-enforcer")


def resolve_backend(name: str) -> str:
    """The engine a --structured-outputs-config.backend value selects."""
    if name in ("auto", "guidance"):
        return "guidance"
    if name in _NOT_SHIPPED:
        raise ValueError(f"structured outputs backend {name!r} is not available here; use auto or guidance")
    raise ValueError(f"unknown structured outputs backend {name!r}; use one of {', '.join(BACKENDS)}")


@dataclass(frozen=True)
class GrammarTokenizer:
    """The engine's view of a tokenizer: its vocabulary and end tokens.

    vocab_size is the width of the model's logits, which may exceed the tokenizer's
    vocabulary (padded embeddings); ids past the vocabulary are never allowed.
    """

    tokenizer_id: str
    vocab_size: int
    engine: llguidance.LLTokenizer

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer, vocab_size: int | None = None) -> GrammarTokenizer:
        serialized = tokenizer.backend.to_str()
        size = vocab_size or tokenizer.vocab_size
        if size < tokenizer.vocab_size:
            raise ValueError(
                f"vocab_size {size} is smaller than the tokenizer's {tokenizer.vocab_size} tokens; "
                "pass the model's logits width"
            )
        eos = list(tokenizer.eos_token_ids)
        if not eos:
            raise ValueError("the tokenizer has no end-of-sequence token; a grammar needs one to finish")
        engine = llguidance.LLTokenizer(serialized, n_vocab=size, eos_token=eos)
        digest = hashlib.sha256(serialized.encode()).hexdigest()[:16]
        return cls(f"{digest}:{size}", size, engine)


@dataclass(frozen=True)
class CompiledGrammar:
    """A grammar bound to a tokenizer; matchers are copies of `template`, never it."""

    spec: StructuredOutputSpec
    tokenizer: GrammarTokenizer
    template: llguidance.LLMatcher


class GrammarCache:
    """At most `capacity` compiled grammars, least recently used evicted first."""

    def __init__(self, capacity: int = 256, backend: str = "auto") -> None:
        if capacity < 1:
            raise ValueError(f"grammar cache capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.backend = resolve_backend(backend)
        self._entries: OrderedDict[tuple, CompiledGrammar] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, spec: StructuredOutputSpec, tokenizer: GrammarTokenizer) -> CompiledGrammar:
        """The compiled grammar of `spec` for `tokenizer`; ValueError if it does not compile."""
        key = (tokenizer.tokenizer_id, *spec.cache_key)
        compiled = self._entries.get(key)
        if compiled is not None:
            self.hits += 1
            self._entries.move_to_end(key)
            return compiled
        self.misses += 1
        compiled = compile_grammar(spec, tokenizer)
        self._entries[key] = compiled
        if len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return compiled


def compile_grammar(spec: StructuredOutputSpec, tokenizer: GrammarTokenizer) -> CompiledGrammar:
    """`spec` bound to `tokenizer`, its first mask computed so the cost is paid here, not in a step."""
    template = llguidance.LLMatcher(tokenizer.engine, validate_spec(spec), log_level=0)
    # The engine builds its lexer lazily; one mask forces the work into the compile.
    template.compute_bitmask()
    if template.is_error():
        raise ValueError(f"structured output {spec.kind} does not compile: {template.get_error()}")
    return CompiledGrammar(spec, tokenizer, template)
