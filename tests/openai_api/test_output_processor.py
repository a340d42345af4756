"""The output processor: engine token ids in, text, stop strings, logprobs and deltas out."""

from __future__ import annotations

import pytest

from common.engine.outputs import RequestOutput, TokenLogprobs
from common.output_processor import OutputOptions, OutputProcessor

PROMPT = "Write one sentence about the sea."


def outputs_for(request_id, token_ids, finish_reason="length", stop_reason=None, logprobs=False):
    """One RequestOutput per token, the last one finished, as the engine reports them."""
    outs = []
    for i, token_id in enumerate(token_ids):
        last = i == len(token_ids) - 1
        lp = (
            [TokenLogprobs(token_id, -0.5, 1, [(token_id, -0.5), (token_id + 1, -2.0)])] if logprobs else None
        )
        outs.append(
            RequestOutput(
                request_id=request_id,
                new_token_ids=[token_id],
                new_logprobs=lp,
                finished=last,
                finish_reason=finish_reason if last else None,
                stop_reason=stop_reason if last else None,
                num_prompt_tokens=7,
                num_cached_tokens=0,
            )
        )
    return outs


def run(tokenizer, token_ids, options=None, **finish):
    processor = OutputProcessor(tokenizer)
    state = processor.add_request("r", tokenizer.encode(PROMPT), options or OutputOptions())
    deltas, aborted = [], []
    for out in outputs_for("r", token_ids, **finish):
        step_deltas, step_aborted = processor.process_outputs([out])
        deltas += step_deltas
        aborted += step_aborted
    return state, deltas, aborted


def test_text_is_the_decoded_output_and_deltas_add_up_to_it(tokenizer):
    text = " The sea is wide, and its waves are calm today."
    ids = tokenizer.encode(text)
    state, deltas, aborted = run(tokenizer, ids)
    assert state.text == tokenizer.decode(ids) == text
    assert "".join(d.text for d in deltas) == text
    assert state.token_ids == ids and state.finish_reason == "length" and not aborted


def test_a_stop_string_cuts_the_text_and_asks_to_abort_the_engine_request(tokenizer):
    ids = tokenizer.encode(" The sea is wide. The waves are calm and the sky is blue.")
    state, deltas, aborted = run(tokenizer, ids, OutputOptions(stop=("waves are",)))
    assert state.text == " The sea is wide. The "
    assert state.finish_reason == "stop" and state.stop_reason == "waves are"
    assert aborted == ["r"]
    assert deltas[-1].finished and "".join(d.text for d in deltas) == state.text
    # nothing after the hit is taken in
    assert len(deltas) < len(ids)


def test_include_stop_str_in_output_keeps_the_stop_string(tokenizer):
    ids = tokenizer.encode(" The sea is wide. The waves are calm.")
    state, _, _ = run(tokenizer, ids, OutputOptions(stop=("wide.",), include_stop_str_in_output=True))
    assert state.text == " The sea is wide."


def test_the_earliest_stop_string_wins(tokenizer):
    ids = tokenizer.encode(" one two three four")
    state, _, _ = run(tokenizer, ids, OutputOptions(stop=("four", "two")))
    assert state.text == " one " and state.stop_reason == "two"


def test_streamed_deltas_never_show_text_a_stop_string_later_cuts(tokenizer):
    ids = tokenizer.encode(" alpha beta gamma delta epsilon")
    state, deltas, _ = run(tokenizer, ids, OutputOptions(stop=("gamma delta",)))
    sent = ""
    for delta in deltas:
        sent += delta.text
        assert state.text.startswith(sent)
    assert sent == state.text == " alpha beta "


def test_eos_that_ends_a_request_is_not_text(tokenizer):
    eos = tokenizer.eos_token_id
    ids = [*tokenizer.encode(" Done"), eos]
    options = OutputOptions(skip_special_tokens=False)
    state, _, _ = run(tokenizer, ids, options, finish_reason="stop")
    assert state.text == " Done" and state.token_ids == ids
    assert state.finish_reason == "stop" and state.stop_reason is None


def test_a_stop_token_is_text_only_with_include_stop_str_in_output(tokenizer):
    ids = tokenizer.encode(" Yes. No")
    stop_token = ids[-1]
    state, _, _ = run(tokenizer, ids, finish_reason="stop", stop_reason=stop_token)
    assert state.text == " Yes." and state.stop_reason == stop_token
    options = OutputOptions(include_stop_str_in_output=True)
    state, _, _ = run(tokenizer, ids, options, finish_reason="stop", stop_reason=stop_token)
    assert state.text == " Yes. No"


def test_multibyte_characters_split_over_tokens_never_come_out_broken(tokenizer):
    text = " Voilà: 東京タワー 🌊🐚"
    ids = tokenizer.encode(text)
    state, deltas, _ = run(tokenizer, ids)
    assert all("\ufffd" not in d.text for d in deltas)
    assert state.text == text


def test_logprobs_carry_each_tokens_string(tokenizer):
    ids = tokenizer.encode(" Hello world")
    processor = OutputProcessor(tokenizer)
    state = processor.add_request("r", [1, 2], OutputOptions(logprobs=True))
    for out in outputs_for("r", ids, logprobs=True):
        processor.process_outputs([out])
    assert [e.token for e in state.logprobs] == [
        tokenizer.decode([i], skip_special_tokens=False) for i in ids
    ]
    assert [e.token_id for e in state.logprobs] == ids
    first = state.logprobs[0]
    assert first.logprob == -0.5
    assert first.top[1] == (ids[0] + 1, tokenizer.decode([ids[0] + 1], skip_special_tokens=False), -2.0)


def test_tokens_can_be_shown_as_token_ids(tokenizer):
    processor = OutputProcessor(tokenizer)
    state = processor.add_request("r", [1], OutputOptions(logprobs=True, return_tokens_as_token_ids=True))
    processor.process_outputs(outputs_for("r", [42], logprobs=True))
    assert state.logprobs[0].token == "token_id:42" and state.logprobs[0].top[1][1] == "token_id:43"


def test_outputs_after_a_stop_string_and_for_unknown_requests_are_ignored(tokenizer):
    ids = tokenizer.encode(" a b c d e")
    processor = OutputProcessor(tokenizer)
    state = processor.add_request("r", [1], OutputOptions(stop=(" b",)))
    outs = outputs_for("r", ids)
    for out in outs[:2]:  # " a", " b": the stop string is complete
        processor.process_outputs([out])
    assert state.finished and state.text == " a"
    deltas, aborted = processor.process_outputs([*outs[2:], *outputs_for("other", [5])])
    assert deltas == [] and aborted == [] and state.token_ids == ids[:2]
    assert not processor.has_unfinished()


def test_request_ids_must_be_unique_while_in_flight(tokenizer):
    processor = OutputProcessor(tokenizer)
    processor.add_request("r", [1], OutputOptions())
    with pytest.raises(ValueError, match="already in flight"):
        processor.add_request("r", [1], OutputOptions())
