"""What the API needs to know about the model it serves, gathered in one place.

The router fills it from the workers' model and config; `pdserve run-batch` from its
in-process engine. Nothing here loads weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from common.config.structured_outputs_config import StructuredOutputsConfig
from common.openai_api.errors import model_not_found


@dataclass
class ServedModel:
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

    @property
    def name(self) -> str:
        return self.names[0]

    def check_model(self, requested: str | None) -> str:
        """The name to report in responses; a 404 OpenAIError for a name not served here.

        A missing `model` means the served one (the OpenAI API requires the field;
        clients of a single-model server often leave it out).
        """
        if requested is not None and requested not in self.names:
            raise model_not_found(requested)
        return self.name
