"""Stop strings cut the output at the first stop, and a stream never shows part of one."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.tokenizer import StopChecker


def feed(checker: StopChecker, deltas: list[str]) -> tuple[str, bool, str | None]:
    shown, stopped, stop = "", False, None
    for delta in deltas:
        check = checker.step(delta)
        shown += check.text
        if check.stopped:
            return shown, True, check.stop
    return shown + checker.finish(), stopped, stop


def test_text_is_cut_before_the_stop_string():
    checker = StopChecker(["\n\n"])
    assert feed(checker, ["Hello", " world.\n", "\nMore text"]) == ("Hello world.", True, "\n\n")
    assert checker.text == "Hello world."


def test_include_stop_str_in_output_keeps_the_stop_string():
    checker = StopChecker(["END"], include_stop_str_in_output=True)
    assert feed(checker, ["abc E", "NDdef"]) == ("abc END", True, "END")


def test_the_stop_that_ends_first_wins_whatever_the_list_order():
    # "bcd" is complete before "abcdef" is, so a character-by-character stream stops there too
    assert feed(StopChecker(["abcdef", "bcd"]), ["xabcdefg"]) == ("xa", True, "bcd")
    assert feed(StopChecker(["bcd", "abcdef"]), list("xabcdefg")) == ("xa", True, "bcd")


def test_of_stops_ending_together_the_longer_wins():
    assert feed(StopChecker(["cd", "abcd"]), ["xxabcdyy"]) == ("xx", True, "abcd")


def test_a_possible_start_of_a_stop_string_is_held_back():
    checker = StopChecker(["<END>"])
    assert checker.step("Hello <E").text == "Hello "
    assert checker.step("N").text == ""
    assert checker.step("X and more").text == "<ENX and more"


def test_held_back_text_is_handed_out_when_the_generation_ends_otherwise():
    checker = StopChecker(["###"])
    assert checker.step("result: #").text == "result: "
    assert checker.finish() == "#"
    assert checker.text == "result: #"


def test_nothing_is_held_back_without_stop_strings_or_when_the_stop_is_kept():
    assert StopChecker([]).step("abc<").text == "abc<"
    assert StopChecker(["<stop>"], include_stop_str_in_output=True).step("abc<st").text == "abc<st"


def test_after_a_stop_nothing_more_is_shown():
    checker = StopChecker(["."])
    assert checker.step("One. Two.").text == "One"
    check = checker.step(" Three.")
    assert (check.text, check.stopped, check.stop) == ("", True, ".")
    assert checker.text == "One"


def test_a_stop_string_spanning_many_deltas_is_found():
    assert feed(StopChecker(["stop here"]), list("please stop here now")) == ("please ", True, "stop here")


def test_empty_stop_strings_are_refused():
    with pytest.raises(ValueError, match="non-empty"):
        StopChecker(["ok", ""])


def _cut(text: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    """The reference: the stop that ends first (the longest of those), by brute force."""
    for end in range(1, len(text) + 1):
        ending = [s for s in stops if text[:end].endswith(s)]
        if ending:
            stop = max(ending, key=len)
            return (text[:end] if include else text[: end - len(stop)]), stop
    return text, None


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="abc\n", max_size=30),
    stops=st.lists(st.text(alphabet="abc\n", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(0, 30)),
    include=st.booleans(),
)
def test_any_way_of_cutting_the_text_into_deltas_gives_the_same_result(text, stops, cuts, include):
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    deltas = [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    checker = StopChecker(stops, include_stop_str_in_output=include)
    expected_text, expected_stop = _cut(text, stops, include)

    shown = ""
    for delta in deltas:
        check = checker.step(delta)
        shown += check.text
        # never shown: anything past the final cut, so no piece of a stop that is removed
        assert expected_text.startswith(shown)
        if check.stopped:
            break
    else:
        shown += checker.finish()
    assert shown == checker.text == expected_text
    assert checker.stopped == (expected_stop is not None)
