"""--max-model-len: resolved against the model, and the one check of a request against it.

The first sentences are vLLM's, word for word; a prompt that alone overflows the
context also says what to change.
"""

from __future__ import annotations

import pytest

from common.config.context_length import context_length_error, resolve_max_model_len


def test_a_request_that_fits_gets_no_error():
    assert context_length_error(50, 14, 64) is None
    assert context_length_error(63, None, 64) is None


def test_prompt_and_completion_over_the_context_get_vllms_message():
    assert context_length_error(50, 20, 64) == (
        "This model's maximum context length is 64 tokens. However, you requested 70 tokens "
        "(50 in the messages, 20 in the completion). Please reduce the length of the messages or completion."
    )


def test_a_prompt_filling_the_context_leaves_no_room_without_max_tokens():
    assert context_length_error(64, None, 64) == (
        "This model's maximum context length is 64 tokens. However, you requested 64 tokens in the "
        "messages, leaving no room for the completion. Please reduce the length of the messages."
    )


@pytest.mark.parametrize("max_tokens", [None, 0, 4])
def test_a_prompt_longer_than_the_context_says_what_to_change(max_tokens):
    message = context_length_error(70, max_tokens, 64)
    assert message.startswith("This model's maximum context length is 64 tokens.")
    assert message.endswith(
        "The prompt has 70 tokens, more than --max-model-len 64; shorten it or raise --max-model-len."
    )


def test_max_model_len_defaults_to_the_models_context():
    assert resolve_max_model_len(None, 8192) == 8192
    assert resolve_max_model_len(4096, 8192) == 4096


@pytest.mark.parametrize(
    ("requested", "says"),
    [(0, "--max-model-len must be at least 1, got 0"), (9000, "--max-model-len 9000 is larger than")],
)
def test_max_model_len_outside_the_model_is_refused(requested, says):
    with pytest.raises(ValueError, match=says):
        resolve_max_model_len(requested, 8192)
