"""`--reasoning-parser qwen3`: Qwen3 opens its reasoning with <think> and closes it with
</think>. With enable_thinking=False its template writes an empty <think></think> into the
prompt and the output has no reasoning; an output that does not open with <think> is all
content.

vLLM's non-streaming reader also wants the </think> before it calls anything reasoning; an
output cut short inside the reasoning is reasoning here, as vLLM's stream sends it."""

from __future__ import annotations

from common.openai_api.reasoning.parser import ReasoningParser


class Qwen3ReasoningParser(ReasoningParser):
    name = "qwen3"
    starts_in_reasoning = False
