"""The engine's side of structured outputs: a grammar matcher for every constrained
request, from grammars compiled once per worker.

A request's matcher lives on the request (`Request.grammar`) and advances with every
output token it appends, so the matcher always stands where the tokens do: a preempted
request recomputes its KV but keeps its tokens and so its matcher, and a decode worker's
request starts from the producer's first token like any other output. The sampler fills
the batch's bitmask from these matchers (common/engine/sampler.py).

The tokenizer the grammars are compiled against is loaded on the first constrained
request: a worker that never sees one never pays for it.
"""

from __future__ import annotations

from collections.abc import Callable

from common.structured_output.grammar_cache import GrammarCache, GrammarTokenizer
from common.structured_output.matcher import GrammarMatcher
from common.structured_output.spec import StructuredOutputSpec
from common.tokenizer.tokenizer import Tokenizer


class StructuredOutputs:
    def __init__(
        self,
        load_tokenizer: Callable[[], Tokenizer],
        vocab_size: int,
        backend: str = "auto",
        capacity: int = 256,
    ) -> None:
        """load_tokenizer: the model's tokenizer, called once when first needed;
        vocab_size: the width of the model's logits."""
        self._load_tokenizer = load_tokenizer
        self._tokenizer: GrammarTokenizer | None = None
        self.vocab_size = vocab_size
        self.cache = GrammarCache(capacity, backend)

    def use_tokenizer(self, tokenizer: GrammarTokenizer) -> None:
        """Compile against `tokenizer` instead of loading the model's (a model of dummy
        weights in a benchmark has none)."""
        if tokenizer.vocab_size != self.vocab_size:
            raise ValueError(
                f"the tokenizer's view has {tokenizer.vocab_size} ids, the logits {self.vocab_size}"
            )
        self._tokenizer = tokenizer

    def matcher_for(self, spec: StructuredOutputSpec) -> GrammarMatcher:
        """A fresh matcher at the start of `spec`'s grammar; ValueError naming the problem
        when the grammar does not compile."""
        if self._tokenizer is None:
            self._tokenizer = GrammarTokenizer.from_tokenizer(self._load_tokenizer(), self.vocab_size)
        return GrammarMatcher(self.cache.get(spec, self._tokenizer))
