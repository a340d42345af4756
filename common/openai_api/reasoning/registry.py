"""The reasoning parsers by their --reasoning-parser names (vLLM's)."""

from __future__ import annotations

from common.openai_api.reasoning.deepseek_r1 import DeepSeekR1ReasoningParser
from common.openai_api.reasoning.parser import ReasoningParser
from common.openai_api.reasoning.qwen3 import Qwen3ReasoningParser

REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    "deepseek_r1": DeepSeekR1ReasoningParser,
    "qwen3": Qwen3ReasoningParser,
}


def get_reasoning_parser(name: str) -> ReasoningParser:
    """The parser for --reasoning-parser `name`; ValueError listing the names otherwise."""
    try:
        return REASONING_PARSERS[name]()
    except KeyError:
        raise ValueError(
            f"unknown --reasoning-parser {name!r}; choose one of {', '.join(sorted(REASONING_PARSERS))}"
        ) from None
