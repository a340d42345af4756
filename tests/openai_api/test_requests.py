"""Request bodies: what is accepted, what is refused with which error, what the engine gets."""

from __future__ import annotations

import pytest

from common.openai_api import (
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIError,
    prepare_chat,
    prepare_completion,
)
from tests.harness.torch_free import assert_imports_without_torch

HELLO = [{"role": "user", "content": "Hello!"}]


def completion(served, **body):
    return prepare_completion(CompletionRequest.parse({"prompt": "Once upon a time", **body}), served)


def chat(served, **body):
    return prepare_chat(ChatCompletionRequest.parse({"messages": HELLO, **body}), served)


def refusal(make, served, **body) -> OpenAIError:
    with pytest.raises(OpenAIError) as caught:
        make(served, **body)
    return caught.value


def test_the_api_modules_do_not_import_torch():
    assert_imports_without_torch("common.openai_api", "common.output_processor")


def test_unknown_fields_are_tolerated(served):
    prepared = completion(served, some_provider_field={"x": 1}, max_tokens=5)
    assert prepared.sequences[0].sampling_params.max_tokens == 5


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"max_tokens": 0}, "max_tokens", "max_tokens must be at least 1"),
        ({"temperature": -0.5}, "temperature", "temperature"),
        ({"top_p": 0}, "top_p", "top_p must be in (0, 1]"),
        ({"top_p": 1.5}, "top_p", "top_p must be in (0, 1]"),
        ({"n": 0}, "n", "n must be at least 1"),
        ({"logprobs": 21}, "logprobs", "logprobs must be in [0, 20]"),
        ({"logprobs": -1}, "logprobs", "logprobs must be non-negative"),
        ({"stop_token_ids": [49152]}, "stop_token_ids", "outside the vocabulary"),
        ({"logit_bias": {"abc": 1}}, "logit_bias", "token ids"),
        ({"prompt": []}, "prompt", "must not be empty"),
        ({"prompt": [1, 99999]}, "prompt", "outside the vocabulary"),
        ({"prompt": {"text": "hi"}}, "prompt", ""),
        ({"echo": True, "logprobs": 1}, "echo", "prompt logprobs"),
        (
            {"response_format": {"type": "yaml"}},
            "response_format",
            "type must be one of 'text', 'json_object'",
        ),
        (
            {"response_format": {"type": "json_object"}, "guided_regex": "a+"},
            "response_format",
            "guided_regex",
        ),
        ({"stream_options": {"include_usage": True}}, "stream_options", "stream is true"),
    ],
)
def test_completion_refusals_are_400s_naming_the_field(served, body, param, words):
    error = refusal(completion, served, **body)
    assert error.status == 400 and error.type == "BadRequestError"
    assert error.param is not None and error.param.startswith(param)
    assert words in error.message


@pytest.mark.parametrize(
    ("messages", "words"),
    [
        ([], "non-empty"),
        (["hello"], "messages[0] must be an object"),
        ([{"content": "hi"}], "messages[0].role must be one of"),
        ([{"role": "wizard", "content": "hi"}], "messages[0].role must be one of"),
        ([{"role": "user"}], "messages[0].content is missing"),
        ([{"role": "user", "content": 7}], "messages[0].content must be a string or a list"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
            "'image_url' is not supported",
        ),
        ([{"role": "user", "content": [{"type": "text"}]}], "content[0].text must be a string"),
    ],
)
def test_malformed_messages_are_400s(served, messages, words):
    error = refusal(chat, served, messages=messages)
    assert error.status == 400 and error.param == "messages"
    assert words in error.message


def test_top_logprobs_needs_logprobs(served):
    error = refusal(chat, served, top_logprobs=3)
    assert error.status == 400 and "`logprobs` must be set to true" in error.message


def test_tool_choice_auto_needs_a_tool_parser_but_none_and_required_are_served(served):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    error = refusal(chat, served, tools=tools)  # no tool_choice with tools: "auto"
    assert (error.status, error.param) == (400, "tool_choice")
    assert '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser' in error.message
    assert chat(served, tools=tools, tool_choice="none").sequences
    assert chat(served, tools=tools, tool_choice="required").sequences[0].sampling_params.structured_outputs


def test_error_body_has_the_openai_shape(served):
    body = refusal(completion, served, temperature=-1).to_body()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == 400


def test_a_prompt_and_max_tokens_over_the_context_get_vllms_message(served, tokenizer):
    max_len = served.max_model_len
    prompt = "one two three four five six seven eight"
    num_prompt = len(tokenizer.encode(prompt))
    max_tokens = max_len - num_prompt + 1
    error = refusal(completion, served, prompt=prompt, max_tokens=max_tokens)
    assert error.status == 400
    assert error.message == (
        f"This model's maximum context length is {max_len} tokens. However, you requested "
        f"{max_len + 1} tokens ({num_prompt} in the messages, {max_tokens} in the completion). "
        "Please reduce the length of the messages or completion."
    )
    assert completion(served, prompt=prompt, max_tokens=max_tokens - 1).sequences


def test_a_prompt_filling_the_whole_context_is_refused_without_max_tokens(served):
    max_len = served.max_model_len
    error = refusal(chat, served, messages=[{"role": "user", "content": "word " * max_len}])
    assert error.status == 400 and f"maximum context length is {max_len} tokens" in error.message


def test_an_unknown_model_is_a_404(served):
    error = refusal(chat, served, model="gpt-4")
    assert error.status == 404 and error.type == "NotFoundError"
    assert error.message == "The model `gpt-4` does not exist."


def test_responses_report_the_first_served_name(served):
    first, alias = served.names
    assert chat(served).model == first
    assert chat(served, model=alias).model == first


def test_chat_max_tokens_defaults_to_the_rest_of_the_context(served):
    max_len = served.max_model_len
    prepared = chat(served)
    num_prompt = len(prepared.prompts[0].token_ids)
    assert prepared.sequences[0].sampling_params.max_tokens == max_len - num_prompt


def test_max_completion_tokens_wins_over_max_tokens(served):
    assert chat(served, max_tokens=9, max_completion_tokens=4).sequences[0].sampling_params.max_tokens == 4


def test_completions_default_to_16_tokens_as_openai_does(served):
    assert completion(served).sequences[0].sampling_params.max_tokens == 16


def test_generation_defaults_apply_unless_the_request_sets_the_field(served):
    served.generation_defaults = {"temperature": 0.6, "top_p": 0.9, "max_new_tokens": 7}
    params = chat(served).sequences[0].sampling_params
    assert (params.temperature, params.top_p, params.max_tokens) == (0.6, 0.9, 7)
    params = chat(served, temperature=0, top_p=1, max_tokens=20).sequences[0].sampling_params
    assert (params.temperature, params.top_p, params.max_tokens) == (0.0, 1.0, 20)


def test_sampling_fields_reach_the_engine(served):
    params = (
        completion(
            served,
            temperature=0.3,
            top_k=5,
            min_p=0.1,
            repetition_penalty=1.2,
            presence_penalty=0.5,
            frequency_penalty=-0.5,
            min_tokens=2,
            ignore_eos=True,
            stop_token_ids=[7],
            logit_bias={"42": -100},
            logprobs=3,
            seed=11,
        )
        .sequences[0]
        .sampling_params
    )
    assert (params.temperature, params.top_k, params.min_p, params.repetition_penalty) == (0.3, 5, 0.1, 1.2)
    assert (params.presence_penalty, params.frequency_penalty, params.min_tokens) == (0.5, -0.5, 2)
    assert params.ignore_eos and params.stop_token_ids == [7] and params.logit_bias == {42: -100.0}
    assert params.logprobs == 3 and params.seed == 11


def test_chat_logprobs_ask_the_engine_for_top_logprobs(served):
    assert chat(served).sequences[0].sampling_params.logprobs is None
    assert chat(served, logprobs=True).sequences[0].sampling_params.logprobs == 0
    assert chat(served, logprobs=True, top_logprobs=4).sequences[0].sampling_params.logprobs == 4


def test_stop_strings_in_either_form_reach_the_output_options(served):
    assert chat(served, stop="\n").options.stop == ("\n",)
    assert chat(served, stop=["a", "", "bc"], include_stop_str_in_output=True).options.stop == ("a", "bc")
    assert chat(served, include_stop_str_in_output=True).options.include_stop_str_in_output


@pytest.mark.parametrize(
    ("prompt", "num_prompts"),
    [("a string", 1), (["one", "two", "three"], 3), ([1, 2, 3], 1), ([[1, 2], [3], [4, 5, 6]], 3)],
)
def test_every_prompt_form_gives_n_choices_per_prompt_in_openais_order(served, prompt, num_prompts):
    prepared = completion(served, prompt=prompt, n=2)
    assert len(prepared.prompts) == num_prompts
    assert [s.index for s in prepared.sequences] == list(range(2 * num_prompts))
    assert [s.prompt_index for s in prepared.sequences] == [i for i in range(num_prompts) for _ in range(2)]
    assert len({s.request_id for s in prepared.sequences}) == 2 * num_prompts


def test_token_id_prompts_are_used_as_given(served):
    prepared = completion(served, prompt=[[5, 6, 7], [8]])
    assert [p.token_ids for p in prepared.prompts] == [[5, 6, 7], [8]]


def test_string_prompts_are_tokenized_with_the_tokenizer(served, tokenizer):
    prepared = completion(served, prompt="The capital of France is")
    assert prepared.prompts[0].token_ids == tokenizer.encode("The capital of France is")


def test_echo_gives_the_prompt_text_even_for_token_ids(served, tokenizer):
    ids = tokenizer.encode("Hello there")
    assert completion(served, prompt=ids, echo=True).prompts[0].text == "Hello there"


def test_truncate_prompt_tokens_keeps_the_end_of_the_prompt(served):
    assert completion(served, prompt=[1, 2, 3, 4, 5], truncate_prompt_tokens=2).prompts[0].token_ids == [4, 5]


def test_seeded_samples_differ_by_seed_but_stay_reproducible(served):
    seeds = [s.sampling_params.seed for s in completion(served, n=3, seed=100).sequences]
    assert seeds == [100, 101, 102]


def test_chat_prompt_is_the_rendered_template_tokenized_without_extra_special_tokens(served, tokenizer):
    prepared = chat(served)
    text = tokenizer.apply_chat_template(HELLO, add_generation_prompt=True)
    assert prepared.prompts[0].text == text
    assert prepared.prompts[0].token_ids == tokenizer.encode(text, add_special_tokens=False)


def test_text_parts_are_joined_as_one_content_string(served, tokenizer):
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]
    prepared = chat(served, messages=[{"role": "user", "content": parts}])
    expected = tokenizer.apply_chat_template([{"role": "user", "content": "Hello\nworld"}])
    assert prepared.prompts[0].text == expected


def test_continue_final_message_leaves_the_assistant_turn_open(served, tokenizer):
    messages = [*HELLO, {"role": "assistant", "content": "Hi! I am"}]
    text = (
        chat(served, messages=messages, add_generation_prompt=False, continue_final_message=True)
        .prompts[0]
        .text
    )
    assert text.endswith("Hi! I am")
    error = refusal(chat, served, messages=messages, continue_final_message=True)
    assert error.param == "continue_final_message"


def test_chat_template_kwargs_reach_the_template_but_cannot_replace_it(served):
    plain = chat(served).prompts[0].text
    same = chat(served, chat_template_kwargs={"chat_template": "{{ 'hijacked' }}", "unused_flag": True})
    assert same.prompts[0].text == plain
