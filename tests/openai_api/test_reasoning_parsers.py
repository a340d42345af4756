"""Reasoning parsers split <think> ... </think> from the answer as vLLM's deepseek_r1 and
qwen3 do, a stream cut anywhere sends what reading the whole output gives, and the engine
can tell from token ids when the reasoning is over."""

from __future__ import annotations

import random

import pytest
import tokenizers
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit

from common.openai_api.reasoning import (
    ReasoningDelta,
    ReasoningTokenIds,
    get_reasoning_parser,
    reasoning_token_ids,
)
from common.tokenizer import Tokenizer

# output -> (reasoning_content, content)
DEEPSEEK_R1 = {
    "the prompt opened the reasoning": (
        "Paris is in France.\n</think>\n\nParis.",
        ("Paris is in France.\n", "\n\nParis."),
    ),
    "the output opens it": ("<think>\nLet me think.\n</think>\n\nYes.", ("\nLet me think.\n", "\n\nYes.")),
    "whitespace before the opening tag is dropped": ("\n\n<think>hm</think>ok", ("hm", "ok")),
    "no end tag: all reasoning": ("still thinking about 東京 🗼", ("still thinking about 東京 🗼", None)),
    "nothing after the end tag": ("done</think>", ("done", None)),
    "nothing before it": ("</think>answer", (None, "answer")),
    "a second end tag is content": ("a</think>b</think>c", ("a", "b</think>c")),
    "a start tag later is text": ("x <think> y</think>z", ("x <think> y", "z")),
    "empty output": ("", (None, None)),
    "part of a tag at the end": ("thinking </thi", ("thinking </thi", None)),
}
QWEN3 = {
    "thinking": (
        "<think>\nThe user greets me.\n</think>\n\nHello!",
        ("\nThe user greets me.\n", "\n\nHello!"),
    ),
    "empty thinking": ("<think>\n\n</think>\n\nHi.", ("\n\n", "\n\nHi.")),
    "thinking disabled: no tags": ("Hello! How can I help?", (None, "Hello! How can I help?")),
    "an end tag without a start is content": ("abc</think>xyz", (None, "abc</think>xyz")),
    "a start tag after text is content": ("Use <think> tags.</think>", (None, "Use <think> tags.</think>")),
    "cut short inside the reasoning": ("<think>\nStep 1: 東京", ("\nStep 1: 東京", None)),
    "whitespace before the opening tag is dropped": ("\n<think>a</think>b", ("a", "b")),
    "a tool call after the reasoning stays content": (
        "<think>call it</think>\n\n<tool_call>\n{}\n</tool_call>",
        ("call it", "\n\n<tool_call>\n{}\n</tool_call>"),
    ),
    "whitespace only": ("\n\n", (None, "\n\n")),
    "part of the start tag only": ("<thi", (None, "<thi")),
}
PARSERS = {"deepseek_r1": DEEPSEEK_R1, "qwen3": QWEN3}
ALL_CASES = [(parser, name) for parser, cases in PARSERS.items() for name in cases]


@pytest.mark.parametrize(("parser", "case"), ALL_CASES)
def test_extract_splits_reasoning_from_content(parser, case):
    output, expected = PARSERS[parser][case]
    assert get_reasoning_parser(parser).extract(output) == expected


def streamed(parser_name: str, chunks: list[str]) -> tuple[str | None, str | None]:
    stream = get_reasoning_parser(parser_name).stream()
    deltas = [stream.feed(chunk) for chunk in chunks] + [stream.finish()]
    reasoning = "".join(d.reasoning for d in deltas if d.reasoning is not None)
    content = "".join(d.content for d in deltas if d.content is not None)
    assert all(d.reasoning != "" and d.content != "" for d in deltas)
    return reasoning or None, content or None


@pytest.mark.parametrize(("parser", "case"), ALL_CASES)
def test_streaming_in_any_chunks_gives_what_extract_gives(parser, case):
    output, expected = PARSERS[parser][case]
    rng = random.Random(f"{parser}/{case}")
    cuts = [list(output), [output]]
    for _ in range(8):
        chunks, at = [], 0
        while at < len(output):
            size = rng.randint(1, 7)
            chunks.append(output[at : at + size])
            at += size
        cuts.append(chunks)
    for chunks in cuts:
        assert streamed(parser, chunks) == expected, chunks


def test_part_of_the_end_tag_waits_for_the_next_delta():
    stream = get_reasoning_parser("deepseek_r1").stream()
    assert stream.in_reasoning
    assert stream.feed("abc</th") == ReasoningDelta("abc", None)
    assert stream.feed("ink>\n\nxyz") == ReasoningDelta(None, "\n\nxyz")
    assert not stream.in_reasoning
    assert stream.finish() == ReasoningDelta(None, None)


def test_qwen3_waits_to_see_whether_the_output_opens_with_think():
    stream = get_reasoning_parser("qwen3").stream()
    assert stream.feed("\n<thi") == ReasoningDelta(None, None)
    assert stream.feed("nk>plan") == ReasoningDelta("plan", None)
    assert stream.in_reasoning
    other = get_reasoning_parser("qwen3").stream()
    assert other.feed("<b>") == ReasoningDelta(None, "<b>")
    assert not other.in_reasoning


def test_a_finished_stream_takes_no_more_text():
    stream = get_reasoning_parser("qwen3").stream()
    stream.finish()
    with pytest.raises(RuntimeError, match="finished"):
        stream.feed("x")


def test_an_unknown_reasoning_parser_lists_the_known_ones():
    with pytest.raises(
        ValueError, match=r"unknown --reasoning-parser 'r1'; choose one of deepseek_r1, qwen3"
    ):
        get_reasoning_parser("r1")


def tiny_tokenizer(words: list[str]) -> Tokenizer:
    vocab = {word: i for i, word in enumerate(["<unk>", *words])}
    backend = tokenizers.Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    return Tokenizer(backend)


def test_reasoning_tags_are_found_in_the_vocabulary():
    tokenizer = tiny_tokenizer(["hello", "<think>", "</think>"])
    ids = reasoning_token_ids(tokenizer, get_reasoning_parser("qwen3"))
    assert ids == ReasoningTokenIds(
        start=tokenizer.token_to_id("<think>"), end=tokenizer.token_to_id("</think>")
    )
    assert ids.end_ids == frozenset({tokenizer.token_to_id("</think>")})


def test_a_vocabulary_without_the_end_tag_is_refused():
    with pytest.raises(ValueError, match=r"--reasoning-parser deepseek_r1 needs </think> as one token"):
        reasoning_token_ids(tiny_tokenizer(["hello", "<think>"]), get_reasoning_parser("deepseek_r1"))


@pytest.mark.parametrize(
    ("text", "ended"),
    [
        ("", False),  # nothing yet: the reasoning (opened by the prompt, or about to be) goes on
        ("hello hello", False),
        ("<think> hello", False),
        ("<think> hello </think>", True),
        ("<think> hello </think> hello", True),
        ("<think> </think> hello <think> hello", False),  # a new reasoning block opened
        ("</think> hello", True),
    ],
)
def test_reasoning_ends_at_the_later_end_tag(text, ended):
    tokenizer = tiny_tokenizer(["hello", "<think>", "</think>"])
    ids = reasoning_token_ids(tokenizer, get_reasoning_parser("deepseek_r1"))
    assert ids.is_reasoning_end(tokenizer.encode(text, add_special_tokens=False)) is ended
