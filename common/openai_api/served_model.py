"""What the API needs to know about the model it serves, gathered in one place.

The router fills it from the workers' model and config; `pdserve run-batch` from its
in-process engine. Nothing here loads weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from common.config.structured_outputs_config import StructuredOutputsConfig
from common.lora.lora_request import LoRARequest
from common.openai_api.errors import model_not_found
from common.openai_api.reasoning import (
    ReasoningParser,
    ReasoningTokenIds,
    get_reasoning_parser,
    reasoning_token_ids,
)
from common.openai_api.tool_calls import ToolParser, get_tool_parser

AUTO_TOOL_CHOICE_NEEDS_PARSER = "Error: --enable-auto-tool-choice requires --tool-call-parser"


@dataclass
class ServedModel:
    """Raises ValueError when the tool-call or reasoning settings do not fit the model."""

    names: list[str]  # --served-model-name, or the model source's name; the first is reported
    max_model_len: int
    tokenizer: Any  # common.tokenizer.Tokenizer
    vocab_size: int  # the model's (may exceed the tokenizer's); bounds token ids in requests
    # the model's generation_config defaults, as the engine's default_sampling_overrides()
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    max_logprobs: int = 20  # --max-logprobs
    enable_prompt_tokens_details: bool = False  # --enable-prompt-tokens-details
    chat_template: str | None = None  # --chat-template (Jinja source); None: the tokenizer's own
    response_role: str = "assistant"  # --response-role: the role of chat responses
    # --structured-outputs-config (with --reasoning-parser): the JSON defaults of requests
    # that do not set them, and the backend a request may not override
    structured_outputs: StructuredOutputsConfig = field(default_factory=StructuredOutputsConfig)
    enable_auto_tool_choice: bool = False  # --enable-auto-tool-choice: tool_choice "auto" is served
    tool_call_parser: str | None = None  # --tool-call-parser: reads calls out of "auto" outputs
    exclude_tools_when_tool_choice_none: bool = False  # --exclude-tools-when-tool-choice-none
    # the LoRA adapters served by name (the router's registry, which runtime loads change);
    # empty without --enable-lora, so an adapter's name is then an unknown model
    adapters: Mapping[str, LoRARequest] = field(default_factory=dict)
    # the reasoning tags of --reasoning-parser in this tokenizer's vocabulary; None without one
    reasoning_ids: ReasoningTokenIds | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        if self.tool_call_parser is not None:
            get_tool_parser(self.tool_call_parser)  # its ValueError lists the parsers
        if self.enable_auto_tool_choice and not self.tool_call_parser:
            raise ValueError(AUTO_TOOL_CHOICE_NEEDS_PARSER)
        parser = self.reasoning_parser
        # a model without the tags cannot be read this way: refuse now, not on every request
        self.reasoning_ids = reasoning_token_ids(self.tokenizer, parser) if parser is not None else None

    @property
    def name(self) -> str:
        return self.names[0]

    @property
    def reasoning_parser(self) -> ReasoningParser | None:
        """--reasoning-parser: splits chat outputs into reasoning_content and content."""
        name = self.structured_outputs.reasoning_parser
        return get_reasoning_parser(name) if name else None

    @property
    def auto_tool_parser(self) -> type[ToolParser] | None:
        """The parser of tool_choice "auto" outputs; None when "auto" is not served."""
        if not self.enable_auto_tool_choice or not self.tool_call_parser:
            return None
        return get_tool_parser(self.tool_call_parser)

    def check_model(self, requested: str | None) -> str:
        """The name to report in responses; a 404 OpenAIError for a name not served here."""
        return self.resolve_model(requested)[0]

    def resolve_model(self, requested: str | None) -> tuple[str, LoRARequest | None]:
        """The name to report in responses and the adapter the request runs under (None: the
        base model); a 404 OpenAIError for a name not served here.

        A missing `model` means the served one (the OpenAI API requires the field;
        clients of a single-model server often leave it out). A request naming an adapter
        is answered under the adapter's name, as vLLM does.
        """
        if requested is None or requested in self.names:
            return self.name, None
        lora = self.adapters.get(requested)
        if lora is None:
            raise model_not_found(requested)
        return lora.name, lora
