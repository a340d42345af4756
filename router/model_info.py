"""What the router knows about the model it serves, read from the model's files without
loading weights: the tokenizer and chat template, the context length, the vocabulary
size, and the generation-config sampling defaults.

The router validates every request against these before a worker sees it, so they must
be the workers' own: start the router with the workers' --model, --tokenizer,
--max-model-len, --generation-config, --override-generation-config and
--structured-outputs-config. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from common.config.context_length import resolve_max_model_len
from common.config.structured_outputs_config import StructuredOutputsConfig
from common.generation_config import read_chat_template, read_generation_config, sampling_defaults
from common.model_files import resolve_model
from common.models.config import load_model_config
from common.openai_api import ServedModel
from common.tokenizer import load_tokenizer


@dataclass
class ModelSettings:
    """The model flags the router shares with the workers (vLLM's names)."""

    model: str | None = None  # None: the embedded default model
    tokenizer: str | None = None
    revision: str | None = None
    download_dir: str | None = None
    hf_config_path: str | None = None
    served_model_name: list[str] | None = None
    max_model_len: int | None = None
    max_logprobs: int = 20
    generation_config: str = "auto"
    override_generation_config: dict[str, Any] = field(default_factory=dict)
    chat_template: str | None = None
    response_role: str = "assistant"
    enable_prompt_tokens_details: bool = False
    # --structured-outputs-config with --reasoning-parser
    structured_outputs: StructuredOutputsConfig = field(default_factory=StructuredOutputsConfig)
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    exclude_tools_when_tool_choice_none: bool = False


def load_served_model(settings: ModelSettings) -> ServedModel:
    """The ServedModel of `settings`; ValueError saying what to fix when the files are wrong,
    or when the model's vocabulary lacks the --reasoning-parser's tags."""
    source = resolve_model(settings.model, settings.revision, settings.download_dir)
    model_config = load_model_config(source, settings.hf_config_path)
    tokenizer = load_tokenizer(source, settings.tokenizer)
    model_len = model_config.max_position_embeddings
    max_model_len = resolve_max_model_len(settings.max_model_len, model_len)
    generation = read_generation_config(
        settings.generation_config, source.path if source.kind == "hf_dir" else None
    )
    defaults = sampling_defaults(generation, settings.override_generation_config)
    max_logprobs = settings.max_logprobs if settings.max_logprobs >= 0 else model_config.vocab_size
    return ServedModel(
        names=list(settings.served_model_name or [source.name]),
        max_model_len=max_model_len,
        tokenizer=tokenizer,
        vocab_size=model_config.vocab_size,
        generation_defaults=defaults,
        max_logprobs=max_logprobs,
        enable_prompt_tokens_details=settings.enable_prompt_tokens_details,
        chat_template=read_chat_template(settings.chat_template),
        response_role=settings.response_role,
        structured_outputs=settings.structured_outputs,
        enable_auto_tool_choice=settings.enable_auto_tool_choice,
        tool_call_parser=settings.tool_call_parser,
        exclude_tools_when_tool_choice_none=settings.exclude_tools_when_tool_choice_none,
    )
