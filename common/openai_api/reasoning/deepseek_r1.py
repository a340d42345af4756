"""`--reasoning-parser deepseek_r1`: DeepSeek-R1 (and its distills) reason first and close the
reasoning with </think>. Its chat template ends the prompt with <think>, so the output
usually starts inside the reasoning without writing it; an output with no </think> is all
reasoning (vLLM's rule)."""

from __future__ import annotations

from common.openai_api.reasoning.parser import ReasoningParser


class DeepSeekR1ReasoningParser(ReasoningParser):
    name = "deepseek_r1"
    starts_in_reasoning = True
