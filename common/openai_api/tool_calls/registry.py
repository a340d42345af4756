"""The tool-call parsers by their --tool-call-parser names (vLLM's)."""

from __future__ import annotations

from common.openai_api.tool_calls.hermes import HermesToolParser
from common.openai_api.tool_calls.llama3_json import Llama3JsonToolParser
from common.openai_api.tool_calls.mistral import MistralToolParser
from common.openai_api.tool_calls.parser import ToolParser
from common.openai_api.tool_calls.qwen3_coder import Qwen3CoderToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesToolParser,
    "llama3_json": Llama3JsonToolParser,
    "llama4_json": Llama3JsonToolParser,
    "mistral": MistralToolParser,
    "qwen3_coder": Qwen3CoderToolParser,
}


def get_tool_parser(name: str) -> type[ToolParser]:
    """The parser class for --tool-call-parser `name`; ValueError listing the names otherwise."""
    try:
        return TOOL_PARSERS[name]
    except KeyError:
        raise ValueError(
            f"unknown --tool-call-parser {name!r}; choose one of {', '.join(sorted(TOOL_PARSERS))}"
        ) from None
