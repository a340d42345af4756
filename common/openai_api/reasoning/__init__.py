"""Reasoning output: splitting what a reasoning model writes into `reasoning_content` and
`content`, and telling the engine when the reasoning is over. Torch-free."""

from common.openai_api.reasoning.parser import ReasoningDelta, ReasoningParser, ReasoningStream
from common.openai_api.reasoning.registry import REASONING_PARSERS, get_reasoning_parser
from common.openai_api.reasoning.token_ids import ReasoningTokenIds, reasoning_token_ids

__all__ = [
    "REASONING_PARSERS",
    "ReasoningDelta",
    "ReasoningParser",
    "ReasoningStream",
    "ReasoningTokenIds",
    "get_reasoning_parser",
    "reasoning_token_ids",
]
