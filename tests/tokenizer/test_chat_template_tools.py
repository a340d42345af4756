"""A tool-using conversation renders exactly as transformers renders it: tools in the system
prompt, assistant tool calls whose arguments the client sent as JSON text, tool results."""

from __future__ import annotations

import copy
import json

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from common.tokenizer import render_chat_template

# Qwen2.5's tool-use template, trimmed: tools listed in the system prompt, <tool_call> for
# the assistant's calls, consecutive tool results in one user turn as <tool_response>.
HERMES_TEMPLATE = """
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}You are a helpful assistant.{%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}{{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object within <tool_call></tool_call> XML tags.<|im_end|>\\n" }}
{%- elif messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' + tool_call.name + '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.index0 == 0 or messages[loop.index0 - 1].role != "tool" %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\\n<tool_response id="' + message.tool_call_id + '">\\n' + message.content + '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != "tool" %}{{- '<|im_end|>\\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "都市の名前"}},
                "required": ["city"],
            },
        },
    },
    {"type": "function", "function": {"name": "get_time", "description": "Current time"}},
]


def call(call_id: str, name: str, arguments) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


USER = {"role": "user", "content": "Weather in Zürich and the time?"}
CALLS_AS_TEXT = {
    "role": "assistant",
    "content": None,
    "tool_calls": [
        call("chatcmpl-tool-1", "get_weather", '{"city": "Zürich", "note": "say \\"hi\\""}'),
        call("chatcmpl-tool-2", "get_time", "{}"),
    ],
}
RESULTS = [
    {"role": "tool", "tool_call_id": "chatcmpl-tool-1", "content": '{"temperature": 21, "sky": "☀️"}'},
    {"role": "tool", "tool_call_id": "chatcmpl-tool-2", "content": [{"type": "text", "text": "14:05"}]},
]
ANSWER = {"role": "assistant", "content": "It is 21 °C and sunny in Zürich; the time is 14:05."}

CONVERSATIONS = {
    "tools and a question": [USER],
    "tools and a system prompt": [{"role": "system", "content": "Be brief."}, USER],
    "calls, results and the answer": [USER, CALLS_AS_TEXT, *RESULTS, ANSWER],
    "calls with text, then a follow-up": [
        USER,
        {**CALLS_AS_TEXT, "content": "Let me look that up."},
        *RESULTS,
        ANSWER,
        {"role": "user", "content": "And tomorrow?"},
    ],
    "calls with empty and missing arguments": [
        USER,
        {"role": "assistant", "tool_calls": [call("a", "get_time", ""), call("b", "get_time", None)]},
        {"role": "tool", "tool_call_id": "a", "content": "14:05"},
        {"role": "tool", "tool_call_id": "b", "content": "14:05"},
    ],
}


def as_transformers_takes_them(messages: list[dict]) -> list[dict]:
    """What a client of transformers passes: arguments as objects ({} when there are none),
    content parts as text, no null fields."""
    plain = []
    for message in copy.deepcopy(messages):
        message = {key: value for key, value in message.items() if value is not None}
        if isinstance(message.get("content"), list):
            message["content"] = "\n".join(part["text"] for part in message["content"])
        for tool_call in message.get("tool_calls", []):
            arguments = tool_call["function"]["arguments"]
            tool_call["function"]["arguments"] = json.loads(arguments) if arguments else {}
        plain.append(message)
    return plain


@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_tool_conversations_render_like_transformers(name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    sent = copy.deepcopy(messages)
    (expected,), _ = render_jinja_template(
        conversations=[as_transformers_takes_them(messages)],
        tools=TOOLS,
        chat_template=HERMES_TEMPLATE,
        add_generation_prompt=add_generation_prompt,
    )
    ours = render_chat_template(
        HERMES_TEMPLATE, messages, tools=TOOLS, add_generation_prompt=add_generation_prompt
    )
    assert ours == expected
    assert messages == sent  # the request's messages are left as the client sent them


def test_calls_and_results_appear_where_the_model_expects_them():
    rendered = render_chat_template(
        HERMES_TEMPLATE, CONVERSATIONS["calls, results and the answer"], tools=TOOLS
    )
    assert (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich", "note": "say \\"hi\\""}}\n</tool_call>'
        in rendered
    )
    assert '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>' in rendered
    assert '<tool_response id="chatcmpl-tool-2">\n14:05\n</tool_response><|im_end|>' in rendered
    assert (
        '{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city"'
        in rendered
    )


def test_arguments_that_are_not_json_are_shown_as_sent():
    messages = [USER, {"role": "assistant", "tool_calls": [call("a", "get_time", "{not json")]}]
    rendered = render_chat_template(HERMES_TEMPLATE, messages, tools=TOOLS)
    assert '"arguments": "{not json"}' in rendered
