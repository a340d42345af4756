"""The request bodies of /v1/completions and /v1/chat/completions, and what they ask of the engine.

Pydantic v2 models with the OpenAI fields and vLLM's extras; unknown fields are kept
and ignored (clients send provider-specific ones). `sampling_params()` turns a body
into the engine's SamplingParams after the model's generation defaults (with the
output's constraint, structured_outputs.py, or a chat request's tool_choice), and
`output_options()` into what the output processor needs (stop strings, detokenizer
settings). Every rejection is an OpenAIError with vLLM's wording where vLLM has one.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema, field_validator

from common.config.context_length import context_length_error
from common.openai_api.errors import bad_request, from_validation_error
from common.openai_api.json_body import json_type_name
from common.openai_api.served_model import ServedModel
from common.openai_api.structured_outputs import StructuredOutputFields
from common.openai_api.tool_calls import ToolChoice, parse_tool_choice, tool_choice_spec, validate_tools
from common.output_processor import OutputOptions
from common.sampling_params import SamplingParams
from common.structured_output.spec import StructuredOutputSpec
from common.structured_output.validation_cache import check_spec

_CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
_MAX_TOP_LOGPROBS = 20  # the OpenAI API's bound for chat top_logprobs

# Bounds that keep one request from costing the server what a thousand would: every
# choice is an engine request, and stop strings and stop token ids are checked per token.
MAX_N = 128  # the OpenAI API's own bound
MAX_CHOICES = 1024  # prompts x n of one completion request
MAX_STOP_STRINGS = 128
MAX_STOP_TOKEN_IDS = 1024
MAX_REQUEST_ID_CHARS = 256  # as for the X-Request-Id header
# integers that travel to the workers must fit the wire's 64 bits
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
Seed = Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]

# Strict: a field takes its JSON type only ("5" is not a number, 1 is not true), as the
# OpenAPI schema says. NaN or infinity in a sampling field would reach the sampler and
# fail a whole step, so they are refused too.
_REQUEST_CONFIG = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


def _documented(default: Any, **schema: Any) -> Any:
    """A field whose bounds check_supported() or SamplingParams.validate() enforce, with
    the API's own wording; `schema` writes them into the OpenAPI description."""
    return Field(default, json_schema_extra=schema)


_TOKEN_IDS = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}
_PROMPT_SCHEMA = {
    "description": "text, a list of texts, token ids, or a list of token-id lists (one choice per prompt)",
    "anyOf": [
        {"type": "string", "minLength": 1},
        {
            "type": "array",
            "minItems": 1,
            "maxItems": MAX_CHOICES,
            "items": {"type": "string", "minLength": 1},
        },
        _TOKEN_IDS,
        {"type": "array", "minItems": 1, "maxItems": MAX_CHOICES, "items": _TOKEN_IDS},
    ],
}
_TEXT_PART = {
    "type": "object",
    "required": ["type", "text"],
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
}
_MESSAGES_SCHEMA = {
    "type": "array",
    "minItems": 1,
    "items": {
        "type": "object",
        "anyOf": [
            {
                "required": ["role", "content"],
                "properties": {
                    "role": {"enum": list(_CHAT_ROLES)},
                    "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART}]},
                },
            },
            {  # an assistant turn that only called tools
                "required": ["role", "tool_calls"],
                "properties": {
                    "role": {"const": "assistant"},
                    "content": {"type": "null"},
                    "tool_calls": {"type": "array", "minItems": 1, "items": {"type": "object"}},
                },
            },
        ],
    },
}


class StreamOptions(BaseModel):
    model_config = _REQUEST_CONFIG
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _GenerationRequest(StructuredOutputFields):
    """Fields the two endpoints share (those that constrain the output in structured_outputs.py)."""

    model_config = _REQUEST_CONFIG

    model: str | None = None
    n: int = _documented(1, minimum=1, maximum=MAX_N)
    temperature: float | None = _documented(None, minimum=0)
    top_p: float | None = _documented(None, exclusiveMinimum=0, maximum=1)
    stop: str | list[str] | None = _documented(None, maxItems=MAX_STOP_STRINGS)
    seed: Seed | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = _documented(None, minimum=-2, maximum=2)
    frequency_penalty: float | None = _documented(None, minimum=-2, maximum=2)
    logit_bias: dict[str, float] | None = _documented(
        None, additionalProperties={"type": "number", "minimum": -100, "maximum": 100}
    )
    user: str | None = None
    # vLLM's extras
    top_k: Int64 | None = _documented(None, minimum=-1)
    min_p: float | None = _documented(None, minimum=0, maximum=1)
    repetition_penalty: float | None = _documented(None, exclusiveMinimum=0, maximum=2)
    min_tokens: int = _documented(0, minimum=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = _documented(
        None, maxItems=MAX_STOP_TOKEN_IDS, items={"type": "integer", "minimum": 0}
    )
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    priority: Int64 = 0
    request_id: str | None = Field(None, max_length=MAX_REQUEST_ID_CHARS)
    cache_salt: str | None = None
    kv_transfer_params: dict[str, Any] | None = None
    return_token_ids: bool = False
    return_tokens_as_token_ids: bool = False
    truncate_prompt_tokens: int | None = _documented(None, minimum=1)
    use_beam_search: bool = False
    prompt_logprobs: int | None = None

    @classmethod
    def parse(cls, body: Any):
        """Validate a decoded JSON body; an OpenAIError 400 names the first bad field."""
        if not isinstance(body, dict):
            raise bad_request(f"the request body must be a JSON object, got {json_type_name(body)}")
        try:
            return cls.model_validate(body)
        except ValidationError as exc:
            raise from_validation_error(exc) from None

    # what each endpoint calls these
    def _requested_max_tokens(self) -> int | None:
        raise NotImplementedError

    def _requested_logprobs(self) -> int | None:
        raise NotImplementedError

    def check_supported(self) -> None:
        """Reject what this server cannot do, instead of silently doing something else."""
        if self.n < 1:
            raise bad_request(f"n must be at least 1, got {self.n}.", "n")
        if self.n > MAX_N:
            raise bad_request(f"n must be at most {MAX_N}, got {self.n}; send several requests instead", "n")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise bad_request(
                f"stop has {len(stops)} strings, more than the {MAX_STOP_STRINGS} allowed", "stop"
            )
        if len(self.stop_token_ids or []) > MAX_STOP_TOKEN_IDS:
            raise bad_request(
                f"stop_token_ids has {len(self.stop_token_ids)} ids, more than the {MAX_STOP_TOKEN_IDS} allowed",
                "stop_token_ids",
            )
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options can only be given when stream is true", "stream_options")
        if self.use_beam_search:
            raise bad_request("use_beam_search is not supported by this server; drop it", "use_beam_search")
        if self.prompt_logprobs is not None:
            raise bad_request(
                "prompt_logprobs is not supported by this server (prompt logprobs are not computed); drop it",
                "prompt_logprobs",
            )
        if self.truncate_prompt_tokens is not None and self.truncate_prompt_tokens < 1:
            raise bad_request(
                f"truncate_prompt_tokens must be at least 1, got {self.truncate_prompt_tokens}",
                "truncate_prompt_tokens",
            )

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return tuple(s for s in stops if s)  # an empty stop string would end every request at once

    def output_options(self) -> OutputOptions:
        return OutputOptions(
            stop=self.stop_strings(),
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            logprobs=self._requested_logprobs() is not None,
            return_tokens_as_token_ids=self.return_tokens_as_token_ids,
        )

    def output_constraint(self, served: ServedModel) -> StructuredOutputSpec | None:
        """The one constraint of the output, checked; None for free text."""
        return self.structured_output_spec(served.structured_outputs)

    def sampling_params(
        self, num_prompt_tokens: int, served: ServedModel, constraint: StructuredOutputSpec | None
    ) -> SamplingParams:
        """The engine's SamplingParams for one prompt of this request, whose output follows
        `constraint` (output_constraint(), computed once for all the prompts).

        Precedence: the request's field, then the model's generation_config default,
        then SamplingParams' own default. Without max_tokens the request may use the
        rest of the context (vLLM's behaviour), capped by the model's max_new_tokens.
        """
        defaults = served.generation_defaults
        max_tokens = self._requested_max_tokens()
        if max_tokens is not None and max_tokens < 1:
            raise bad_request(f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens")
        too_long = context_length_error(num_prompt_tokens, max_tokens, served.max_model_len)
        if too_long is not None:
            raise bad_request(too_long, "messages")
        if max_tokens is None:
            max_tokens = served.max_model_len - num_prompt_tokens
            default_cap = defaults.get("max_tokens", defaults.get("max_new_tokens"))
            if default_cap is not None:
                max_tokens = min(max_tokens, int(default_cap))

        def pick(name: str, fallback):
            value = getattr(self, name)
            if value is None:
                value = defaults.get(name, fallback)
            return value

        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=float(pick("temperature", 1.0)),
            top_p=float(pick("top_p", 1.0)),
            top_k=int(pick("top_k", 0)),
            min_p=float(pick("min_p", 0.0)),
            seed=self.seed,
            presence_penalty=float(pick("presence_penalty", 0.0)),
            frequency_penalty=float(pick("frequency_penalty", 0.0)),
            repetition_penalty=float(pick("repetition_penalty", 1.0)),
            logit_bias=self._logit_bias(),
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
            stop_token_ids=list(self.stop_token_ids or []),
            logprobs=self._requested_logprobs(),
            structured_outputs=constraint,
        )
        try:
            params.validate(served.vocab_size, served.max_logprobs)
        except ValueError as exc:
            message = str(exc)
            raise bad_request(message, _field_named_in(message)) from None
        return params

    def _logit_bias(self) -> dict[int, float] | None:
        if not self.logit_bias:
            return None
        bias = {}
        for key, value in self.logit_bias.items():
            try:
                bias[int(key)] = float(value)
            except ValueError:
                raise bad_request(
                    f"logit_bias keys must be token ids (integers as strings), got {key!r}", "logit_bias"
                ) from None
        return bias


class CompletionRequest(_GenerationRequest):
    """POST /v1/completions."""

    prompt: Annotated[str | list[str] | list[int] | list[list[int]], WithJsonSchema(_PROMPT_SCHEMA)]
    max_tokens: int | None = _documented(16, minimum=1)  # the OpenAI API's and vLLM's default
    logprobs: int | None = _documented(None, minimum=0)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    add_special_tokens: bool = True

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_has_one_of_four_shapes(cls, prompt: Any) -> Any:
        if isinstance(prompt, str) or (isinstance(prompt, list) and _is_prompt_list(prompt)):
            return prompt
        raise ValueError(
            "prompt must be a string, a list of strings, a list of token ids, or a list of token-id lists; "
            f"got {json_type_name(prompt)} that is none of these"
        )

    def check_supported(self) -> None:
        super().check_supported()
        if self.suffix:
            raise bad_request("suffix is not supported by this server; drop it", "suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise bad_request(f"best_of ({self.best_of}) other than n ({self.n}) is not supported", "best_of")
        if self.echo and self.logprobs is not None:
            raise bad_request(
                "echo with logprobs needs prompt logprobs, which this server does not compute; "
                "drop echo or logprobs",
                "echo",
            )
        if self.logprobs is not None and self.logprobs < 0:
            raise bad_request(f"logprobs must be non-negative, got {self.logprobs}", "logprobs")

    def _requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def _requested_logprobs(self) -> int | None:
        return self.logprobs


class ChatCompletionRequest(_GenerationRequest):
    """POST /v1/chat/completions."""

    messages: Annotated[list[Any], WithJsonSchema(_MESSAGES_SCHEMA)]
    # deprecated by OpenAI in favour of max_completion_tokens
    max_tokens: int | None = _documented(None, minimum=1)
    max_completion_tokens: int | None = _documented(None, minimum=1)
    logprobs: bool = False
    top_logprobs: int | None = _documented(None, minimum=0, maximum=_MAX_TOP_LOGPROBS)
    tools: list[dict[str, Any]] | None = Field(
        None,
        description='Functions the model may call: [{"type": "function", "function": {"name", '
        '"description", "parameters": <JSON schema>}}]. They are rendered into the chat template.',
    )
    tool_choice: str | dict[str, Any] | None = Field(
        None,
        description='"none", "auto" (needs --enable-auto-tool-choice and --tool-call-parser), "required" '
        '(at least one call) or {"type": "function", "function": {"name": ...}}. Default: "auto" with '
        'tools, "none" without.',
    )
    parallel_tool_calls: bool = Field(
        True, description='false: tool_choice "required" makes exactly one call.'
    )
    include_reasoning: bool = Field(
        True, description="false: leave reasoning_content out (with --reasoning-parser)."
    )
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    add_special_tokens: bool = False  # the chat template already holds the special tokens

    @field_validator("messages")
    @classmethod
    def _messages_are_well_formed(cls, messages: list[Any]) -> list[Any]:
        if not messages:
            raise ValueError('messages must be a non-empty list of {"role", "content"} objects')
        for i, message in enumerate(messages):
            _check_message(i, message)
        return messages

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise bad_request(
                    "when using `top_logprobs`, `logprobs` must be set to true.", "top_logprobs"
                )
            if not 0 <= self.top_logprobs <= _MAX_TOP_LOGPROBS:
                raise bad_request(
                    f"top_logprobs must be in [0, {_MAX_TOP_LOGPROBS}], got {self.top_logprobs}",
                    "top_logprobs",
                )
        if self.continue_final_message and self.add_generation_prompt:
            raise bad_request(
                "continue_final_message and add_generation_prompt cannot both be true; "
                "set add_generation_prompt to false to continue the final message",
                "continue_final_message",
            )
        if self.continue_final_message and self.messages[-1].get("role") != "assistant":
            raise bad_request(
                "continue_final_message needs the last message to be the assistant's",
                "continue_final_message",
            )

    def checked_tools(self) -> list[dict[str, Any]] | None:
        """`tools` when every definition is well formed; a 400 naming the first that is not."""
        if self.tools is None:
            return None
        try:
            return validate_tools(self.tools)
        except ValueError as exc:
            raise bad_request(str(exc), "tools") from None

    def tool_choice_of(self, served: ServedModel) -> ToolChoice:
        """What tool_choice asks for, checked against the tools and what the server offers."""
        tools = self.checked_tools()
        try:
            choice = parse_tool_choice(self.tool_choice, tools)
        except ValueError as exc:
            raise bad_request(str(exc), "tool_choice") from None
        if choice.mode == "auto" and served.auto_tool_parser is None:
            raise bad_request(
                '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set '
                '(tool_choice is "auto" when tools are sent without it); start the server with both, '
                'or send tool_choice "required", "none" or {"type": "function", "function": {"name": ...}}',
                "tool_choice",
            )
        return choice

    def template_tools(self, served: ServedModel) -> list[dict[str, Any]] | None:
        """The tools the chat template shows the model: none with tool_choice "none" under
        --exclude-tools-when-tool-choice-none."""
        tools = self.checked_tools()
        if self.tool_choice == "none" and served.exclude_tools_when_tool_choice_none:
            return None
        return tools

    def output_constraint(
        self, served: ServedModel, choice: ToolChoice | None = None
    ) -> StructuredOutputSpec | None:
        """The output's one constraint: tool_choice "required" or a named function makes one
        (with the structured_outputs switches, else the server's defaults), which leaves
        no room for another."""
        choice = choice if choice is not None else self.tool_choice_of(served)
        if not choice.constrained:
            return super().output_constraint(served)
        others = [constraint.param for constraint in self._constraints()]
        if others:
            raise bad_request(
                f"{_described(choice)} and {' and '.join(others)} both constrain the output, and a request "
                f'takes one constraint; drop {" and ".join(others)}, or send tool_choice "auto" or "none"',
                "tool_choice",
            )
        config = served.structured_outputs
        self._refuse_whitespace_patterns()
        self._check_backend(config)
        try:
            spec = tool_choice_spec(choice, self.tools or [], self.parallel_tool_calls)
            assert spec is not None
            spec = replace(spec, **self._switches(config))
            check_spec(spec)
        except ValueError as exc:
            raise bad_request(f"{_described(choice)}: {exc}", "tools") from None
        return spec

    def template_messages(self) -> list[dict[str, Any]]:
        """The messages as the chat template reads them: text parts joined into one string."""
        rendered = []
        for message in self.messages:
            content = message.get("content")
            if isinstance(content, list):
                content = "\n".join(part["text"] for part in content)
            rendered.append({**message, "content": content})
        return rendered

    def _requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def _requested_logprobs(self) -> int | None:
        if not self.logprobs:
            return None
        return self.top_logprobs or 0


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_prompt_list(items: list[Any]) -> bool:
    return (
        all(isinstance(p, str) for p in items)
        or all(_is_token_id(t) for t in items)
        or all(isinstance(p, list) and all(_is_token_id(t) for t in p) for p in items)
    )


def _check_message(i: int, message: Any) -> None:
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise ValueError(f'{where} must be an object with "role" and "content", got {type(message).__name__}')
    role = message.get("role")
    if role not in _CHAT_ROLES:
        raise ValueError(f"{where}.role must be one of {', '.join(_CHAT_ROLES)}; got {role!r}")
    content = message.get("content")
    if content is None:
        calls = message.get("tool_calls")
        if (
            role == "assistant"
            and isinstance(calls, list)
            and calls
            and all(isinstance(c, dict) for c in calls)
        ):
            return
        raise ValueError(f"{where}.content is missing; give a string or a list of text parts")
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise ValueError(
            f"{where}.content must be a string or a list of text parts, got {type(content).__name__}"
        )
    for j, part in enumerate(content):
        if not isinstance(part, dict) or "type" not in part:
            raise ValueError(f'{where}.content[{j}] must be an object like {{"type": "text", "text": "..."}}')
        if part["type"] != "text":
            raise ValueError(
                f"{where}.content[{j}]: part type {part['type']!r} is not supported; this model reads text parts only"
            )
        if not isinstance(part.get("text"), str):
            raise ValueError(f"{where}.content[{j}].text must be a string")


def _described(choice: ToolChoice) -> str:
    if choice.mode == "function":
        return f"tool_choice (the function {choice.function!r})"
    return f'tool_choice "{choice.mode}"'


def _field_named_in(message: str) -> str | None:
    """SamplingParams.validate() starts each message with the field's name."""
    head = message.split(" ", 1)[0].rstrip(":")
    return head if head in SamplingParams.__dataclass_fields__ else None
