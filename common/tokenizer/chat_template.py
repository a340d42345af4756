"""Rendering a conversation into prompt text with the model's Jinja chat template.

Templates are written for transformers' `apply_chat_template`, so they are rendered
in the environment it sets up: a sandbox that cannot modify its inputs, with
trim_blocks and lstrip_blocks, `{% break %}`/`{% continue %}`, the
`{% generation %}` block (rendered as its body), `raise_exception(msg)`,
`strftime_now(fmt)`, and a `tojson` filter that keeps non-ASCII text as it is and
accepts indent, separators and sort_keys. The variables are the messages, `tools`,
`documents`, `add_generation_prompt`, the named special tokens (`bos_token`,
`eos_token`, ...) and any extra keyword arguments.

OpenAI-shaped messages are made plain first: a content list of text parts becomes one
string (parts joined by newlines), keys whose value is null are dropped, and tool call
arguments sent as a JSON string become objects (missing or empty ones {}), which is what
templates expect. Tool results (role "tool", with their tool_call_id) pass as they are.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Appended to the final message for continue_final_message, to find where it ends in
# the rendered text; the trailing space shows whether the template trimmed the message.
_CONTINUE_MARKER = "PDSERVE_CONTINUE_FINAL_MESSAGE "


class ChatTemplateError(ValueError):
    """The template could not be compiled or rejected the conversation."""


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training
    masks; serving only needs the body rendered, in its own scope as transformers does."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


_ENV = _environment()


@lru_cache(maxsize=32)
def compile_chat_template(source: str) -> jinja2.Template:
    try:
        return _ENV.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(
            f"the chat template is not valid Jinja (line {exc.lineno}: {exc.message})"
        ) from None


def render_chat_template(
    template: str,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = False,
    continue_final_message: bool = False,
    tools: list[dict[str, Any]] | None = None,
    documents: list[dict[str, Any]] | None = None,
    special_tokens: Mapping[str, str] | None = None,
    **template_kwargs: Any,
) -> str:
    """The prompt text for `messages`, as transformers' apply_chat_template(tokenize=False) gives it.

    continue_final_message leaves the final message open (the template's end-of-turn
    text after it is cut) so the model continues it; it excludes add_generation_prompt.
    """
    if continue_final_message and add_generation_prompt:
        raise ValueError(
            "continue_final_message and add_generation_prompt cannot both be true: the first continues "
            "the final message, the second starts a new assistant message; set add_generation_prompt=false"
        )
    if not messages:
        raise ValueError("messages is empty; a conversation needs at least one message")
    plain = [_plain_message(message, index) for index, message in enumerate(messages)]
    if tools is not None and not all(isinstance(tool, Mapping) for tool in tools):
        raise ValueError("tools must be a list of JSON objects (function schemas)")
    if documents is not None and not all(isinstance(doc, Mapping) for doc in documents):
        raise ValueError("documents must be a list of JSON objects")

    final_text = None
    if continue_final_message:
        final_text = plain[-1].get("content")
        if not isinstance(final_text, str):
            raise ValueError("continue_final_message needs the final message to have text content")
        plain[-1]["content"] = final_text + _CONTINUE_MARKER

    compiled = compile_chat_template(template)
    variables = {**(special_tokens or {}), **template_kwargs}
    try:
        rendered = compiled.render(
            messages=plain,
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
    except jinja2.TemplateError as exc:  # raise_exception(...) and sandbox violations
        raise ChatTemplateError(exc.message or str(exc)) from None
    except Exception as exc:  # the template did something the messages do not allow
        raise ChatTemplateError(
            f"the chat template failed on these messages ({type(exc).__name__}: {exc})"
        ) from None

    if final_text is not None:
        rendered = _cut_after_final_message(rendered, final_text)
    return rendered


def _cut_after_final_message(rendered: str, final_text: str) -> str:
    tag = _CONTINUE_MARKER.strip()
    if final_text.strip() not in rendered or tag not in rendered:
        raise ChatTemplateError(
            "continue_final_message: the chat template does not show the final message as written, "
            "so it cannot be continued; check that the template renders the final message's content"
        )
    at = rendered.rindex(tag)
    if rendered[at : at + len(_CONTINUE_MARKER)] == _CONTINUE_MARKER:
        return rendered[:at]
    # the template trimmed the message, and with it any trailing whitespace of its own
    return rendered[:at].rstrip()


def _plain_message(message: Any, index: int) -> dict[str, Any]:
    if not isinstance(message, Mapping):
        raise ValueError(f"messages[{index}] must be an object with 'role' and 'content', got {message!r}")
    plain = {key: value for key, value in message.items() if value is not None}
    if "role" not in plain:
        raise ValueError(f"messages[{index}] has no 'role'")
    content = plain.get("content")
    if isinstance(content, list):
        plain["content"] = _join_text_parts(content, index)
    elif content is not None and not isinstance(content, str):
        raise ValueError(
            f"messages[{index}].content must be a string or a list of text parts, got {type(content).__name__}"
        )
    if "tool_calls" in plain:
        plain["tool_calls"] = [_plain_tool_call(call) for call in plain["tool_calls"]]
    return plain


def _join_text_parts(parts: list[Any], index: int) -> str:
    texts = []
    for part_index, part in enumerate(parts):
        where = f"messages[{index}].content[{part_index}]"
        if not isinstance(part, Mapping):
            raise ValueError(f"{where} must be an object like {{'type': 'text', 'text': ...}}, got {part!r}")
        kind = part.get("type")
        if kind != "text":
            raise ValueError(
                f"{where} has type {kind!r}; this model takes text only, so every content part "
                "must be {'type': 'text', 'text': ...}"
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise ValueError(f"{where} is a text part without a string 'text'")
        texts.append(text)
    return "\n".join(texts)


def _plain_tool_call(call: Any) -> Any:
    """OpenAI sends a tool call's arguments as a JSON string; templates index them as an object.

    Missing, null or empty arguments become {} (a call without arguments), as vLLM reads them.
    """
    if not isinstance(call, Mapping) or not isinstance(call.get("function"), Mapping):
        return call
    arguments = call["function"].get("arguments")
    if arguments is None or arguments == "":
        parsed: Any = {}
    elif not isinstance(arguments, str):
        return call
    else:
        try:
            parsed = json.loads(arguments)
        except json.JSONDecodeError:
            return call  # left as the client wrote it; the template shows it verbatim
    return {**call, "function": {**call["function"], "arguments": parsed}}
