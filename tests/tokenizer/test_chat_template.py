"""Chat templates render exactly as transformers' apply_chat_template(tokenize=False) renders them."""

from __future__ import annotations

from datetime import datetime

import pytest

from common.tokenizer import ChatTemplateError, render_chat_template

SYSTEM = {"role": "system", "content": "You are a terse assistant."}
USER = {"role": "user", "content": "What is the capital of France?"}
ASSISTANT = {"role": "assistant", "content": "Paris."}
FOLLOW_UP = {"role": "user", "content": "And of Japan? 日本の首都は？ 🗼"}

CONVERSATIONS = {
    "one user message": [USER],
    "system and user": [SYSTEM, USER],
    "multi-turn": [SYSTEM, USER, ASSISTANT, FOLLOW_UP],
    "multi-turn without system": [USER, ASSISTANT, FOLLOW_UP],
    "ends with assistant": [USER, ASSISTANT],
    "empty content": [{"role": "user", "content": ""}],
    "whitespace and newlines": [{"role": "user", "content": "  line one\n\n\tline two  \n"}],
    "special tokens in content": [{"role": "user", "content": "say <|im_end|> please"}],
}


@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_model_template_renders_like_transformers(
    smollm2_tokenizer, hf_smollm2_tokenizer, name, add_generation_prompt
):
    messages = CONVERSATIONS[name]
    expected = hf_smollm2_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert (
        smollm2_tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        == expected
    )


def test_model_template_adds_its_default_system_prompt_only_without_a_system_message(smollm2_tokenizer):
    without = smollm2_tokenizer.apply_chat_template([USER])
    with_system = smollm2_tokenizer.apply_chat_template([SYSTEM, USER])
    assert "You are a helpful AI assistant named SmolLM" in without
    assert "You are a helpful AI assistant named SmolLM" not in with_system
    assert with_system.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize(
    "final",
    ["The capital is", "Sure, here it is: ", "Line one\n", "中文回答", ""],
)
def test_continue_final_message_renders_like_transformers(smollm2_tokenizer, hf_smollm2_tokenizer, final):
    messages = [USER, {"role": "assistant", "content": final}]
    expected = hf_smollm2_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=False, continue_final_message=True
    )
    ours = smollm2_tokenizer.apply_chat_template(
        messages, add_generation_prompt=False, continue_final_message=True
    )
    assert ours == expected
    assert ours.endswith("<|im_start|>assistant\n" + final)


def test_continue_final_message_cut_after_a_template_that_trims(hf_smollm2_tokenizer, smollm2_tokenizer):
    template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] | trim }}</{{ m['role'] }}>{% endfor %}"
    )
    messages = [USER, {"role": "assistant", "content": "  Paris is   "}]
    expected = hf_smollm2_tokenizer.apply_chat_template(
        messages, tokenize=False, chat_template=template, continue_final_message=True
    )
    ours = smollm2_tokenizer.apply_chat_template(
        messages, chat_template=template, add_generation_prompt=False, continue_final_message=True
    )
    assert ours == expected == f"<user>{USER['content']}</user><assistant>Paris is"


def test_continue_final_message_excludes_add_generation_prompt(smollm2_tokenizer):
    with pytest.raises(ValueError, match="cannot both be true"):
        smollm2_tokenizer.apply_chat_template([USER, ASSISTANT], continue_final_message=True)


def test_continue_final_message_fails_clearly_when_the_template_drops_the_message(smollm2_tokenizer):
    template = "{% for m in messages %}{{ m['role'] }};{% endfor %}"
    with pytest.raises(ValueError, match="cannot be continued"):
        smollm2_tokenizer.apply_chat_template(
            [USER, ASSISTANT],
            chat_template=template,
            add_generation_prompt=False,
            continue_final_message=True,
        )


def test_text_parts_are_joined_into_one_string(smollm2_tokenizer, hf_smollm2_tokenizer):
    parts = [{"type": "text", "text": "First part."}, {"type": "text", "text": "Second part."}]
    ours = smollm2_tokenizer.apply_chat_template([{"role": "user", "content": parts}])
    expected = hf_smollm2_tokenizer.apply_chat_template(
        [{"role": "user", "content": "First part.\nSecond part."}], tokenize=False, add_generation_prompt=True
    )
    assert ours == expected


@pytest.mark.parametrize(
    ("part", "complaint"),
    [
        (
            {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
            "has type 'image_url'; this model takes text only",
        ),
        ({"type": "text"}, "without a string 'text'"),
        ("just a string", "must be an object"),
    ],
)
def test_non_text_parts_are_refused_with_a_clear_message(smollm2_tokenizer, part, complaint):
    with pytest.raises(ValueError, match=complaint):
        smollm2_tokenizer.apply_chat_template(
            [{"role": "user", "content": [{"type": "text", "text": "hi"}, part]}]
        )


def test_malformed_messages_are_refused_with_a_clear_message(smollm2_tokenizer):
    with pytest.raises(ValueError, match="messages is empty"):
        smollm2_tokenizer.apply_chat_template([])
    with pytest.raises(ValueError, match=r"messages\[1\] has no 'role'"):
        smollm2_tokenizer.apply_chat_template([USER, {"content": "x"}])
    with pytest.raises(ValueError, match=r"messages\[0\].content must be a string"):
        smollm2_tokenizer.apply_chat_template([{"role": "user", "content": 5}])


# Templates exercising each feature of transformers' environment; each renders the same here and there.
FEATURE_TEMPLATES = {
    "loop controls": (
        "{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}{% endif %}"
        "{{ m['content'] }}|{% if loop.index > 1 %}{% break %}{% endif %}{% endfor %}"
    ),
    "trim and lstrip blocks": (
        "{% for m in messages %}\n    {% if m['role'] == 'user' %}\n"
        "U: {{ m['content'] }}\n    {% else %}\nO: {{ m['content'] }}\n    {% endif %}\n{% endfor %}\n"
        "{% if add_generation_prompt %}\nA:{% endif %}"
    ),
    "tojson like transformers": (
        "{{ messages | tojson }}\n{{ messages[-1] | tojson(indent=2) }}\n"
        "{{ {'b': 1, 'a': 'é'} | tojson(separators=(',', ':'), sort_keys=true) }}\n{{ tools | tojson }}"
    ),
    "special token variables": "{{ bos_token }}{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}",
    "extra keyword variables": "{% if enable_thinking is defined and not enable_thinking %}/no_think {% endif %}{{ x }}",
    "generation block": (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}"
        "{% endgeneration %}{% else %}{{ m['content'] }}{% endif %};{% endfor %}"
    ),
    "namespace": (
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + m['content'] | length %}"
        "{% endfor %}{{ ns.n }}"
    ),
    "tools": (
        "{% if tools %}{% for t in tools %}{{ t['function']['name'] }}({{ t['function']['parameters'] | tojson }}) "
        "{% endfor %}{% endif %}{{ messages[-1]['content'] }}"
    ),
    "undefined is empty": "[{{ messages[0].missing }}][{{ not_passed }}]",
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "名前"}},
            },
        },
    }
]


@pytest.mark.parametrize("name", FEATURE_TEMPLATES)
def test_template_features_render_like_transformers(smollm2_tokenizer, hf_smollm2_tokenizer, name):
    template = FEATURE_TEMPLATES[name]
    messages = [SYSTEM, USER, ASSISTANT, FOLLOW_UP]
    kwargs = {"enable_thinking": False, "x": "extra"}
    expected = hf_smollm2_tokenizer.apply_chat_template(
        messages, tokenize=False, chat_template=template, tools=TOOLS, add_generation_prompt=True, **kwargs
    )
    ours = smollm2_tokenizer.apply_chat_template(messages, chat_template=template, tools=TOOLS, **kwargs)
    assert ours == expected


def test_raise_exception_becomes_a_value_error_with_the_templates_message(smollm2_tokenizer):
    template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversations must start with user') }}{% endif %}"
    with pytest.raises(ValueError, match="^Conversations must start with user$"):
        smollm2_tokenizer.apply_chat_template([ASSISTANT], chat_template=template)


def test_strftime_now_gives_the_current_date(smollm2_tokenizer):
    rendered = smollm2_tokenizer.apply_chat_template([USER], chat_template="{{ strftime_now('%Y-%m') }}")
    assert rendered == datetime.now().strftime("%Y-%m")


def test_templates_cannot_modify_their_inputs(smollm2_tokenizer):
    messages = [USER, ASSISTANT]
    with pytest.raises(ValueError):
        smollm2_tokenizer.apply_chat_template(messages, chat_template="{{ messages.pop() }}")
    assert messages == [USER, ASSISTANT]


def test_invalid_jinja_is_refused_with_its_line(smollm2_tokenizer):
    with pytest.raises(ChatTemplateError, match=r"not valid Jinja \(line 2"):
        smollm2_tokenizer.apply_chat_template([USER], chat_template="ok\n{% for m in messages %}")


def test_template_errors_on_the_messages_become_value_errors(smollm2_tokenizer):
    with pytest.raises(ValueError, match="failed on these messages"):
        smollm2_tokenizer.apply_chat_template([USER], chat_template="{{ messages[0]['content'] + 5 }}")


def test_null_fields_are_dropped_and_tool_call_arguments_become_objects():
    template = (
        "{% for m in messages %}{{ m['role'] }}:{{ 'content' in m }}"
        "{% for c in m.get('tool_calls', []) %} {{ c['function']['arguments']['city'] }}{% endfor %};{% endfor %}"
    )
    messages = [
        USER,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
    ]
    assert render_chat_template(template, messages) == "user:True;assistant:False Paris;"


def test_named_templates_are_chosen_by_name_or_by_tools(smollm2_tokenizer):
    from common.tokenizer import Tokenizer

    tokenizer = Tokenizer(
        smollm2_tokenizer.backend,
        smollm2_tokenizer.special_tokens,
        {
            "default": "default:{{ messages[0]['content'] }}",
            "tool_use": "tools:{{ tools | length if tools else 0 }}",
        },
    )
    assert tokenizer.apply_chat_template([USER]) == "default:" + USER["content"]
    assert tokenizer.apply_chat_template([USER], tools=TOOLS) == "tools:1"
    assert tokenizer.apply_chat_template([USER], chat_template="tool_use") == "tools:0"
    assert (
        tokenizer.apply_chat_template([USER], chat_template="inline {{ eos_token }}") == "inline <|im_end|>"
    )


def test_a_model_without_a_template_says_what_to_do(smollm2_tokenizer):
    from common.tokenizer import Tokenizer

    tokenizer = Tokenizer(smollm2_tokenizer.backend, smollm2_tokenizer.special_tokens, {})
    assert tokenizer.chat_template is None
    with pytest.raises(ValueError, match="no chat template.*--chat-template"):
        tokenizer.apply_chat_template([USER])
