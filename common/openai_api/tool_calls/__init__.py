"""Tool calling: the request's tools and tool_choice, and reading calls out of the output.

`tools.validate_tools` and `tool_choice.parse_tool_choice` check a request;
`tool_choice.tool_choice_spec` is the output constraint of "required" and named choices,
whose output `forced_calls` reads; for "auto", the --tool-call-parser named in `registry`
reads the model's own format. Every reader offers `extract(text)` for a whole output and
`stream()` for one being generated. Torch-free.
"""

from common.openai_api.tool_calls.forced_calls import forced_calls_parser
from common.openai_api.tool_calls.parser import ToolCallStream, ToolParser
from common.openai_api.tool_calls.registry import TOOL_PARSERS, get_tool_parser
from common.openai_api.tool_calls.tool_call import (
    ContentDelta,
    ExtractedToolCalls,
    StreamDelta,
    ToolCall,
    ToolCallDelta,
    collect_deltas,
    make_tool_call_id,
)
from common.openai_api.tool_calls.tool_choice import ToolChoice, parse_tool_choice, tool_choice_spec
from common.openai_api.tool_calls.tools import validate_tools

__all__ = [
    "TOOL_PARSERS",
    "ContentDelta",
    "ExtractedToolCalls",
    "StreamDelta",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallStream",
    "ToolChoice",
    "ToolParser",
    "collect_deltas",
    "forced_calls_parser",
    "get_tool_parser",
    "make_tool_call_id",
    "parse_tool_choice",
    "tool_choice_spec",
    "validate_tools",
]
