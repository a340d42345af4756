"""From a validated request body to the engine requests it needs.

A completion request may carry several prompts and ask n samples of each; a chat
request renders its messages (and its tools) through the chat template into one
prompt. Either way the result is a PreparedRequest: one `SequenceSpec` per choice, in
the order of the response's choice indices (prompt i, sample j -> index i * n + j, as
OpenAI numbers them), plus what the response builders need: for chat, how each choice's
output is read (reasoning, tool calls).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, replace

from common.lora.lora_request import LoRARequest
from common.openai_api.chat_output import ChatOutputReader
from common.openai_api.errors import bad_request
from common.openai_api.requests import MAX_CHOICES, ChatCompletionRequest, CompletionRequest
from common.openai_api.served_model import ServedModel
from common.openai_api.tool_calls import ToolChoice, forced_calls_parser
from common.output_processor import OutputOptions
from common.sampling_params import SamplingParams
from common.structured_output.spec import StructuredOutputSpec


@dataclass
class PromptInput:
    token_ids: list[int]
    text: str | None = None  # the prompt as text, for echo; None until someone needs it


@dataclass
class SequenceSpec:
    """One choice of the response: one engine request."""

    request_id: str  # the engine's id, unique per choice
    index: int  # the choice index in the response
    prompt_index: int
    prompt_token_ids: list[int]
    sampling_params: SamplingParams


@dataclass
class PreparedRequest:
    kind: str  # "completion" | "chat"
    id: str  # the response id: cmpl-... or chatcmpl-...
    model: str  # the name reported in responses
    created: int
    request: CompletionRequest | ChatCompletionRequest
    prompts: list[PromptInput]
    sequences: list[SequenceSpec]
    options: OutputOptions
    priority: int = 0
    cache_salt: str | None = None
    # chat: how each choice's output becomes a message; None: all of it is content
    reader: ChatOutputReader | None = None
    lora: LoRARequest | None = None  # the adapter `model` named; None: the base model


def prepare_completion(request: CompletionRequest, served: ServedModel) -> PreparedRequest:
    """Validate a completion request against the model and tokenize its prompts."""
    request.check_supported()
    model, lora = served.resolve_model(request.model)
    prompts = [_truncate(p, request.truncate_prompt_tokens) for p in completion_prompts(request, served)]
    if request.echo:
        for prompt in prompts:
            if prompt.text is None:
                prompt.text = served.tokenizer.decode(prompt.token_ids)
    response_id = f"cmpl-{request.request_id or uuid.uuid4().hex}"
    constraint = request.output_constraint(served)
    prepared = _prepared("completion", response_id, model, request, prompts, served, constraint)
    prepared.lora = lora
    return prepared


def prepare_chat(request: ChatCompletionRequest, served: ServedModel) -> PreparedRequest:
    """Validate a chat request against the model, render its messages and tokenize them."""
    request.check_supported()
    model, lora = served.resolve_model(request.model)
    choice = request.tool_choice_of(served)
    constraint = request.output_constraint(served, choice)
    prompt_text = render_chat_prompt(request, served)
    token_ids = served.tokenizer.encode(prompt_text, add_special_tokens=request.add_special_tokens)
    prompt = _truncate(PromptInput(token_ids, prompt_text), request.truncate_prompt_tokens)
    _check_not_empty(prompt, "messages")
    response_id = f"chatcmpl-{request.request_id or uuid.uuid4().hex}"
    prepared = _prepared("chat", response_id, model, request, [prompt], served, constraint)
    prepared.lora = lora
    prepared.reader = output_reader(request, choice, served)
    if served.auto_tool_parser is not None and request.tools and choice.mode != "none":
        # a tool parser reads tags that may be special tokens (<tool_call> is, in Qwen's
        # vocabulary), so they must stay in the text, as vLLM's parsers ask
        prepared.options = replace(prepared.options, skip_special_tokens=False)
    return prepared


def output_reader(
    request: ChatCompletionRequest, choice: ToolChoice, served: ServedModel
) -> ChatOutputReader | None:
    """How the request's choices are read: the --reasoning-parser first, then the reader of
    its tool calls; None when the output is all content."""
    if choice.constrained:
        tools = forced_calls_parser(choice)
    elif choice.mode == "auto" and (parser := served.auto_tool_parser) is not None:
        tools = parser(request.tools)
    else:
        tools = None
    reasoning = served.reasoning_parser
    if tools is None and reasoning is None:
        return None
    return ChatOutputReader(
        reasoning=reasoning,
        tools=tools,
        forced=choice.constrained,
        include_reasoning=request.include_reasoning,
    )


def render_chat_prompt(request: ChatCompletionRequest, served: ServedModel) -> str:
    """The chat template applied to the request's messages and tools, as text."""
    # template variables only: these names are the request's own fields, or the server's choice
    template_kwargs = {
        key: value
        for key, value in (request.chat_template_kwargs or {}).items()
        if key
        not in ("messages", "add_generation_prompt", "continue_final_message", "tools", "chat_template")
    }
    tools = request.template_tools(served)
    try:
        return served.tokenizer.apply_chat_template(
            request.template_messages(),
            add_generation_prompt=request.add_generation_prompt,
            continue_final_message=request.continue_final_message,
            tools=tools,
            chat_template=served.chat_template,
            **template_kwargs,
        )
    except Exception as exc:  # the template's own raise_exception, or a shape it cannot read
        raise bad_request(f"the chat template could not render these messages: {exc}", "messages") from None


def completion_prompts(request: CompletionRequest, served: ServedModel) -> list[PromptInput]:
    """The prompt field in any of its four forms, as token ids."""
    prompt = request.prompt
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise bad_request("prompt must not be empty", "prompt")
    if isinstance(prompt[0], int):
        prompt = [prompt]
    if len(prompt) * request.n > MAX_CHOICES:
        raise bad_request(
            f"{len(prompt)} prompts x n={request.n} make {len(prompt) * request.n} choices, more than the "
            f"{MAX_CHOICES} one request may ask for; split the prompts over several requests",
            "prompt",
        )
    prompts = []
    for item in prompt:
        if isinstance(item, str):
            ids = served.tokenizer.encode(item, add_special_tokens=request.add_special_tokens)
            prompts.append(PromptInput(list(ids), item))
        else:
            bad = next((t for t in item if not 0 <= t < served.vocab_size), None)
            if bad is not None:
                raise bad_request(
                    f"prompt: token id {bad} is outside the vocabulary [0, {served.vocab_size})", "prompt"
                )
            prompts.append(PromptInput(list(item)))
        _check_not_empty(prompts[-1], "prompt")
    return prompts


def _prepared(
    kind: str,
    response_id: str,
    model: str,
    request: CompletionRequest | ChatCompletionRequest,
    prompts: list[PromptInput],
    served: ServedModel,
    constraint: StructuredOutputSpec | None,
) -> PreparedRequest:
    sequences = []
    for prompt_index, prompt in enumerate(prompts):
        params = request.sampling_params(len(prompt.token_ids), served, constraint)
        after = _constraint_starts_after(constraint, prompt.token_ids, served)
        if after is not None:
            params = replace(params, structured_outputs_after=after)
        for sample in range(request.n):
            # n samples of one seeded request must differ, yet stay reproducible
            sample_params = (
                replace(params, seed=_sample_seed(params.seed, sample))
                if params.seed is not None and sample
                else params
            )
            index = prompt_index * request.n + sample
            sequences.append(
                SequenceSpec(f"{response_id}-{index}", index, prompt_index, prompt.token_ids, sample_params)
            )
    return PreparedRequest(
        kind=kind,
        id=response_id,
        model=model,
        created=int(time.time()),
        request=request,
        prompts=prompts,
        sequences=sequences,
        options=request.output_options(),
        priority=request.priority,
        cache_salt=request.cache_salt,
    )


def _constraint_starts_after(
    constraint: StructuredOutputSpec | None, prompt_token_ids: list[int], served: ServedModel
) -> int | None:
    """The token after which the constraint applies: the end of reasoning (</think>) with a
    --reasoning-parser, unless enable_in_reasoning constrains the reasoning too or the prompt
    has already ended it (a template that closes the reasoning itself, as Qwen3's does
    with enable_thinking=False)."""
    ids = served.reasoning_ids
    if constraint is None or ids is None or served.structured_outputs.enable_in_reasoning:
        return None
    return None if ids.is_reasoning_end(prompt_token_ids) else ids.end


def _sample_seed(seed: int, sample: int) -> int:
    """The seed of sample `sample` of n; it stays in the wire's 64 bits (2**64 - 1 wraps to 0)."""
    return seed + sample if seed < 0 else (seed + sample) % 2**64


def _truncate(prompt: PromptInput, keep: int | None) -> PromptInput:
    if keep is None or len(prompt.token_ids) <= keep:
        return prompt
    return PromptInput(prompt.token_ids[-keep:])  # the text no longer matches; echo re-decodes it


def _check_not_empty(prompt: PromptInput, param: str) -> None:
    if not prompt.token_ids:
        raise bad_request(f"{param}: the prompt is empty after tokenization; give at least one token", param)
