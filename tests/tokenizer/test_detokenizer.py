"""Incremental detokenization: the streamed text is the decoded text, never revised, never a broken character."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.tokenizer import IncrementalDetokenizer, Tokenizer

FFFD = "\ufffd"
HYPOTHESIS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def stream(
    detokenizer: IncrementalDetokenizer, ids: list[int], chunks: list[int], final_text: str
) -> list[str]:
    """Feed `ids` in chunks of the given sizes; check after every step that nothing shown is
    ever taken back; return the deltas (the last step passes final=True)."""
    deltas, at = [], 0
    sizes = [size for size in chunks if size] or [len(ids)]
    while at < len(ids) or not deltas:
        size = sizes[len(deltas) % len(sizes)]
        piece = ids[at : at + size]
        at += len(piece)
        deltas.append(detokenizer.step(piece, final=at >= len(ids)))
        assert final_text.startswith(detokenizer.text)
    return deltas


@HYPOTHESIS
@given(
    prompt=st.lists(st.integers(0, 49151), max_size=12),
    output=st.lists(st.integers(0, 49151), max_size=40),
    chunks=st.lists(st.integers(0, 4), max_size=6),
    skip_special_tokens=st.booleans(),
)
def test_random_tokens_stream_exactly_their_decoded_text(
    smollm2_tokenizer, prompt, output, chunks, skip_special_tokens
):
    expected = smollm2_tokenizer.decode(output, skip_special_tokens=skip_special_tokens)
    detokenizer = IncrementalDetokenizer(smollm2_tokenizer, prompt, skip_special_tokens=skip_special_tokens)
    deltas = stream(detokenizer, output, chunks, expected)
    assert "".join(deltas) == detokenizer.text == expected


MULTIBYTE_TEXTS = [
    "😀👍🏽 family 👨‍👩‍👧‍👦 flags 🇯🇵🇫🇷",
    "中文测试：你好，世界！日本語のテキスト。한국어 문장입니다.",
    "mixed: naïve café → résumé ∑∫√∞ 🎉 done",
]


@pytest.mark.parametrize("text", MULTIBYTE_TEXTS)
def test_characters_split_across_tokens_are_never_shown_broken(smollm2_tokenizer, text):
    prompt = smollm2_tokenizer.encode("<|im_start|>assistant\n")
    output = smollm2_tokenizer.encode(text, add_special_tokens=False)
    # the text really is cut inside characters: some tokens alone are not valid UTF-8
    assert any(FFFD in smollm2_tokenizer.decode([token]) for token in output)
    detokenizer = IncrementalDetokenizer(smollm2_tokenizer, prompt)
    deltas = [detokenizer.step([token]) for token in output]
    assert all(FFFD not in delta for delta in deltas)
    assert "".join(deltas) == detokenizer.text == text
    assert detokenizer.step([], final=True) == ""


def test_a_trailing_incomplete_character_is_held_until_the_end(smollm2_tokenizer):
    output = smollm2_tokenizer.encode("ok 😀", add_special_tokens=False)
    cut = next(i for i in range(1, len(output)) if smollm2_tokenizer.decode(output[:i]).endswith(FFFD))
    detokenizer = IncrementalDetokenizer(smollm2_tokenizer, [])
    shown = detokenizer.step(output[:cut])
    assert FFFD not in shown
    # the generation ends there: the last step shows the incomplete bytes as decode() does
    assert shown + detokenizer.step([], final=True) == smollm2_tokenizer.decode(output[:cut])


def test_a_prompt_ending_inside_a_character_does_not_change_the_output_text(smollm2_tokenizer):
    ids = smollm2_tokenizer.encode("答え", add_special_tokens=False)
    cut = next(i for i in range(1, len(ids)) if smollm2_tokenizer.decode(ids[:i]).endswith(FFFD))
    detokenizer = IncrementalDetokenizer(smollm2_tokenizer, ids[:cut])
    text = "".join(detokenizer.step([token]) for token in ids[cut:]) + detokenizer.step([], final=True)
    assert text == smollm2_tokenizer.decode(ids[cut:])


def test_special_tokens_are_shown_only_when_not_skipped(smollm2_tokenizer):
    output = smollm2_tokenizer.encode("Hi<|im_end|>", add_special_tokens=False)
    shown = IncrementalDetokenizer(smollm2_tokenizer, [], skip_special_tokens=False)
    hidden = IncrementalDetokenizer(smollm2_tokenizer, [])
    assert "".join(shown.step([t]) for t in output) == "Hi<|im_end|>"
    assert "".join(hidden.step([t]) for t in output) == "Hi"


class CountingTokenizer(Tokenizer):
    def __init__(self, inner: Tokenizer):
        super().__init__(inner.backend, inner.special_tokens, inner.chat_templates)
        self.decoded_lengths: list[int] = []

    def decode(self, ids, skip_special_tokens=True):
        self.decoded_lengths.append(len(ids))
        return super().decode(ids, skip_special_tokens)


def test_each_step_decodes_a_short_window_not_the_whole_output(smollm2_tokenizer):
    tokenizer = CountingTokenizer(smollm2_tokenizer)
    text = ("The quick brown fox 🦊 jumps over the lazy dog 🐶; 狐狸跳过了懒狗。 " * 60).strip()
    output = tokenizer.encode(text, add_special_tokens=False)
    assert len(output) > 1000
    detokenizer = IncrementalDetokenizer(tokenizer, tokenizer.encode("Tell me a story."))
    for token in output:
        detokenizer.step([token])
    assert detokenizer.text == text
    assert max(tokenizer.decoded_lengths) <= 12


# SentencePiece: a word's leading "▁" is a space only when something precedes it, so the
# output is decoded in the context of the prompt, as it reads after it.


def test_sentencepiece_output_reads_as_it_follows_the_prompt(tiny_spm_tokenizer):
    prompt = tiny_spm_tokenizer.encode("Hello")
    full = tiny_spm_tokenizer.encode("Hello world the lazy fox")
    assert full[: len(prompt)] == prompt
    detokenizer = IncrementalDetokenizer(tiny_spm_tokenizer, prompt)
    text = "".join(detokenizer.step([token]) for token in full[len(prompt) :])
    assert text == " world the lazy fox"


@HYPOTHESIS
@given(
    prompt_text=st.sampled_from(["Hello", "def main", "the lazy", "x"]),
    output=st.lists(st.integers(0, 421), max_size=30),
    chunks=st.lists(st.integers(0, 3), max_size=5),
    skip_special_tokens=st.booleans(),
)
def test_sentencepiece_random_tokens_stream_their_text_after_the_prompt(
    tiny_spm_tokenizer, prompt_text, output, chunks, skip_special_tokens
):
    tokenizer = tiny_spm_tokenizer
    prompt = tokenizer.encode(prompt_text)
    prompt_alone = tokenizer.decode(prompt, skip_special_tokens=skip_special_tokens)
    together = tokenizer.decode(prompt + output, skip_special_tokens=skip_special_tokens)
    expected = together[len(prompt_alone) :]
    detokenizer = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip_special_tokens)
    assert "".join(stream(detokenizer, output, chunks, expected)) == expected
