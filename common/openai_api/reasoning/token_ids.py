"""The reasoning tags as token ids, for the engine: a grammar that constrains only the
answer (structured outputs with a reasoning parser) starts once the reasoning is over."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from common.openai_api.reasoning.parser import ReasoningParser


class Vocabulary(Protocol):
    def token_to_id(self, token: str) -> int | None: ...


@dataclass(frozen=True)
class ReasoningTokenIds:
    start: int | None  # <think>, when the vocabulary has it
    end: int  # </think>: the token that ends reasoning

    @property
    def end_ids(self) -> frozenset[int]:
        """The ids that end reasoning."""
        return frozenset((self.end,))

    def is_reasoning_end(self, token_ids: Sequence[int]) -> bool:
        """Whether reasoning is over at the end of `token_ids` (the prompt's, then the output's
        so far): the later of the start and end tags is the end tag, as vLLM decides. The
        prompt counts: a template that closes the reasoning there (Qwen3 with
        enable_thinking=False) has ended it before the first output token."""
        for token in reversed(token_ids):
            if token == self.end:
                return True
            if token == self.start:
                return False
        return False


def reasoning_token_ids(tokenizer: Vocabulary, parser: ReasoningParser) -> ReasoningTokenIds:
    """The parser's tags in the tokenizer's vocabulary; ValueError when the end tag is not
    one token of it (a model that does not reason this way)."""
    end = tokenizer.token_to_id(parser.end_token)
    if end is None:
        raise ValueError(
            f"--reasoning-parser {parser.name} needs {parser.end_token} as one token of the model's "
            "vocabulary, and this model has none; use a reasoning parser written for this model, "
            "or leave --reasoning-parser out"
        )
    return ReasoningTokenIds(start=tokenizer.token_to_id(parser.start_token), end=end)
