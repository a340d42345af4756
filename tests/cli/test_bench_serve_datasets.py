"""`pdserve bench serve`'s requests: prompts with exactly the asked token count, shared
prefixes that are equal token for token, ShareGPT-style files, Mooncake-style traces,
prompts that ask for JSON under a schema (json, json-unique) and how their answers are
counted; and the streaming client's handling of chunks, usage, failures and schemas."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from pdserve.bench.serve.client import ApiTarget, send_request
from pdserve.bench.serve.datasets import (
    BUILT_IN_SCHEMAS_PATH,
    SampleRequest,
    check_structured_outputs,
    follows_schema,
    json_schema_requests,
    prefix_repetition_requests,
    random_requests,
    sharegpt_requests,
    trace_requests,
)
from pdserve.bench.serve.metrics import RequestResult, compute_metrics
from pdserve.bench.serve.prompt_builder import PromptBuilder
from pdserve.bench.serve.report import RunSettings, format_summary, result_json
from pdserve.bench.serve.text_tokenizer import LocalTokenizer


@pytest.fixture(scope="module")
def tokenizer(smollm2_source):
    return LocalTokenizer(str(smollm2_source.path))


@pytest.fixture(scope="module")
def builder(tokenizer):
    return PromptBuilder(tokenizer, add_special_tokens=True, seed=0)


def _ids(tokenizer, request: SampleRequest) -> list[int]:
    return tokenizer.encode(request.prompt, True)


def test_random_prompts_have_exactly_their_token_counts_within_the_range(tokenizer, builder):
    requests = random_requests(builder, 20, input_len=100, output_len=10, range_ratio=0.5, seed=3)
    assert len(requests) == 20
    for request in requests:
        assert len(_ids(tokenizer, request)) == request.prompt_len
        assert 50 <= request.prompt_len <= 150
        assert 5 <= request.expected_output_len <= 15
    assert len({r.prompt_len for r in requests}) > 1  # the range is used
    assert len({r.prompt for r in requests}) == 20
    again = random_requests(builder, 20, input_len=100, output_len=10, range_ratio=0.5, seed=3)
    assert [r.prompt for r in again] == [r.prompt for r in requests]


def test_random_prompts_share_a_prefix_of_the_asked_tokens(tokenizer, builder):
    requests = random_requests(builder, 4, input_len=30, output_len=4, prefix_len=40, seed=1)
    ids = [_ids(tokenizer, r) for r in requests]
    assert all(len(i) == 70 for i in ids)
    assert all(i[:40] == ids[0][:40] for i in ids)
    assert len({tuple(i[40:]) for i in ids}) == 4


def test_random_range_ratio_of_one_or_more_is_refused(builder):
    with pytest.raises(ValueError, match="--random-range-ratio"):
        random_requests(builder, 1, 10, 10, range_ratio=1.0)


def test_chat_prompts_count_the_content_without_special_tokens(tokenizer):
    chat_builder = PromptBuilder(tokenizer, add_special_tokens=False, seed=0)
    (request,) = random_requests(chat_builder, 1, input_len=64, output_len=4)
    assert len(tokenizer.encode(request.prompt, False)) == request.prompt_len == 64


def test_prefix_repetition_prompts_share_their_group_prefix_token_for_token(tokenizer, builder):
    requests = prefix_repetition_requests(
        builder, 9, prefix_len=32, suffix_len=16, num_prefixes=3, output_len=8, seed=2
    )
    ids = [_ids(tokenizer, r) for r in requests]
    assert all(len(i) == 48 and r.prompt_len == 48 for i, r in zip(ids, requests, strict=True))
    groups: dict[tuple[int, ...], int] = {}
    for i in ids:
        groups[tuple(i[:32])] = groups.get(tuple(i[:32]), 0) + 1
    assert sorted(groups.values()) == [3, 3, 3]
    assert len({tuple(i[32:]) for i in ids}) == 9
    assert {r.expected_output_len for r in requests} == {8}


def test_a_trace_shares_blocks_where_hash_ids_match_and_keeps_its_times(tmp_path, tokenizer, builder):
    trace = tmp_path / "trace.jsonl"
    lines = [
        {"timestamp": 1000, "input_length": 40, "output_length": 5, "hash_ids": [7, 8, 9]},
        {"timestamp": 1500, "input_length": 36, "output_length": 3, "hash_ids": [7, 8, 4]},
        {"timestamp": 3000, "input_length": 20, "output_length": 2, "hash_ids": [5, 6]},
        {"timestamp": 4000, "input_length": 20, "output_length": 2, "hash_ids": [5, 6]},
    ]
    trace.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    requests = trace_requests(str(trace), builder, num_prompts=3, block_size=16, time_scale=0.5)
    assert len(requests) == 3  # the first --num-prompts lines
    assert [r.send_at_s for r in requests] == [0.0, 0.25, 1.0]
    assert [r.expected_output_len for r in requests] == [5, 3, 2]
    a, b, c = (_ids(tokenizer, r) for r in requests)
    assert (len(a), len(b), len(c)) == (40, 36, 20)
    assert a[:32] == b[:32]  # blocks 7 and 8
    assert a[32:36] != b[32:36]  # block 9 against block 4
    assert a[:16] != c[:16]


def test_a_malformed_trace_line_is_named(tmp_path, builder):
    trace = tmp_path / "bad.jsonl"
    trace.write_text(
        '{"timestamp": 0, "input_length": 4, "output_length": 1, "hash_ids": []}\n{"timestamp": 5}\n'
    )
    with pytest.raises(ValueError, match="line 2"):
        trace_requests(str(trace), builder, num_prompts=10)


def test_sharegpt_takes_the_first_two_turns_and_leaves_out_short_ones(tmp_path, tokenizer):
    data = [
        {"conversations": [{"from": "human", "value": "Explain how a rainbow forms in the sky."},
                           {"from": "gpt", "value": "Sunlight bends inside raindrops and splits into colours."}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello there, how are you?"}]},
        {"conversations": [{"role": "user", "content": "Name three primary colours please, quickly."},
                           {"role": "assistant", "content": "Red, yellow and blue are the three."}]},
        {"conversations": [{"from": "human", "value": "only one turn"}]},
    ]  # fmt: skip
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    requests = sharegpt_requests(str(path), tokenizer, True, num_prompts=2)
    assert sorted(r.prompt for r in requests) == [
        "Explain how a rainbow forms in the sky.",
        "Name three primary colours please, quickly.",
    ]
    for request in requests:
        assert request.prompt_len == len(tokenizer.encode(request.prompt, True))
    rainbow = next(r for r in requests if "rainbow" in r.prompt)
    assert rainbow.expected_output_len == len(
        tokenizer.encode("Sunlight bends inside raindrops and splits into colours.", False)
    )
    fixed = sharegpt_requests(str(path), tokenizer, True, num_prompts=5, output_len=7)
    assert len(fixed) == 5 and {r.expected_output_len for r in fixed} == {7}  # used again to make 5


def test_sharegpt_file_that_is_not_a_list_is_refused(tmp_path, tokenizer):
    path = tmp_path / "bad.json"
    path.write_text('{"conversations": []}')
    with pytest.raises(ValueError, match="JSON list"):
        sharegpt_requests(str(path), tokenizer, True, num_prompts=1)


# -- json, json-unique: answers under a JSON schema ------------------------------------

POINT = {
    "title": "point on a map",
    "type": "object",
    "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
    "required": ["x", "y"],
}


def _built_ins() -> list[dict]:
    return [entry["schema"] for entry in json.loads(BUILT_IN_SCHEMAS_PATH.read_text())]


def test_json_prompts_ask_for_each_built_in_schema_in_turn_and_show_it(tokenizer):
    built_ins = _built_ins()
    assert len(built_ins) == 5
    requests = json_schema_requests(tokenizer, True, num_prompts=7, output_len=64, seed=1)
    assert [r.json_schema for r in requests] == [built_ins[i % 5] for i in range(7)]
    for request in requests:
        assert json.dumps(request.json_schema) in request.prompt
        assert request.prompt_len == len(_ids(tokenizer, request))
        assert request.expected_output_len == 64
    assert "a customer order" in requests[3].prompt


def test_json_unique_gives_every_request_a_schema_of_its_own(tokenizer):
    built_ins = _built_ins()
    requests = json_schema_requests(tokenizer, False, num_prompts=6, output_len=8, unique=True, seed=2)
    assert len({json.dumps(r.json_schema) for r in requests}) == 6
    for i, request in enumerate(requests):
        base = built_ins[i % 5]
        extra = set(request.json_schema["properties"]) - set(base["properties"])
        assert len(extra) == 1 and next(iter(extra)).startswith("__optional_field_")
        assert request.json_schema["required"] == base["required"]  # the extra field is optional
        assert request.prompt_len == len(tokenizer.encode(request.prompt, False))
    assert _built_ins() == built_ins and "__optional_field" not in json.dumps(built_ins)
    again = json_schema_requests(tokenizer, False, num_prompts=6, output_len=8, unique=True, seed=2)
    assert [r.json_schema for r in again] == [r.json_schema for r in requests]


def test_structured_output_ratio_constrains_that_share_of_the_same_prompts(tokenizer):
    half = json_schema_requests(tokenizer, True, num_prompts=10, output_len=8, structured_ratio=0.5)
    assert sum(r.json_schema is not None for r in half) == 5
    every = json_schema_requests(tokenizer, True, num_prompts=10, output_len=8)
    assert [r.prompt for r in half] == [r.prompt for r in every]  # free or not, the same question
    none = json_schema_requests(tokenizer, True, num_prompts=4, output_len=8, structured_ratio=0.0)
    assert all(r.json_schema is None for r in none)
    with pytest.raises(ValueError, match="--structured-output-ratio 1.5 must be in"):
        json_schema_requests(tokenizer, True, num_prompts=4, output_len=8, structured_ratio=1.5)


def test_a_schema_file_gives_the_schemas_and_a_bad_one_is_named(tmp_path, tokenizer):
    one = tmp_path / "point.json"
    one.write_text(json.dumps(POINT))
    requests = json_schema_requests(tokenizer, True, num_prompts=2, output_len=8, schema_path=str(one))
    assert [r.json_schema for r in requests] == [POINT, POINT]
    assert "an example of a point on a map as JSON" in requests[0].prompt
    several = tmp_path / "several.json"
    several.write_text(json.dumps([POINT, {"type": "array"}]))
    requests = json_schema_requests(tokenizer, True, num_prompts=3, output_len=8, schema_path=str(several))
    assert [r.json_schema for r in requests] == [POINT, {"type": "array"}, POINT]
    assert "an example of an object as JSON" in requests[1].prompt  # no title
    for text, says in (
        ("{not json", "cannot read it as JSON"),
        ("[]", "a non-empty list"),
        ('[{"type": "object"}, {"type": 5}]', "schema 1 is not a valid JSON schema"),
    ):
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(ValueError, match=says):
            json_schema_requests(tokenizer, True, num_prompts=1, output_len=8, schema_path=str(bad))


def test_an_answer_follows_its_schema_only_as_one_valid_json_value():
    assert follows_schema(' {"x": 1, "y": 2}\n', POINT)
    assert not follows_schema('{"x": 1}', POINT)  # y is required
    assert not follows_schema('{"x": 1, "y": 2', POINT)  # cut short
    assert not follows_schema('Sure! {"x": 1, "y": 2}', POINT)
    email = {"type": "string", "format": "email"}
    assert follows_schema('"ada@example.com"', email) and not follows_schema('"ada"', email)


def test_the_report_counts_the_valid_structured_outputs():
    requests = [SampleRequest("q", 1, 8, json_schema=POINT) for _ in range(3)] + [SampleRequest("q", 1, 8)]
    texts = ['{"x": 1, "y": 2}', '{"x": 1}', '{"x": 1, "y": 2}', "free text"]
    results = [
        RequestResult(prompt_len=1, success=True, output_tokens=4, ttft=0.1, latency=0.2, generated_text=t)
        for t in texts
    ]
    results[2].success = False  # failed: its answer does not count, whatever came
    check_structured_outputs(requests, results)
    assert [r.follows_schema for r in results] == [True, False, False, None]
    metrics = compute_metrics(results, duration=1.0)
    assert (metrics.structured_outputs.constrained, metrics.structured_outputs.valid) == (3, 1)
    settings = RunSettings("openai-chat", "m", "t", 4, float("inf"), 1.0, None, ["ttft"])
    summary = format_summary(metrics, settings)
    assert "Structured outputs requested:            3" in summary
    assert "Valid structured outputs:                1" in summary
    assert "Correct rate (%):                        33.33" in summary
    document = result_json(metrics, settings, results, "date", detailed=True)
    assert document["num_structured_outputs"] == 3 and document["num_valid_structured_outputs"] == 1
    assert document["correct_rate(%)"] == pytest.approx(100 / 3)
    assert document["follows_schema"] == [True, False, False, None]
    # a run without constraints reports none of it
    free = compute_metrics(results[3:], duration=1.0)
    assert free.structured_outputs is None
    assert "Valid structured outputs" not in format_summary(free, settings)
    assert "correct_rate(%)" not in result_json(free, settings, results[3:], "date", detailed=True)


# -- the streaming client, against canned server answers ---------------------------------


def _sse(*payloads: object) -> bytes:
    return b"".join(
        b"data: " + (p if isinstance(p, bytes) else json.dumps(p).encode()) + b"\n\n" for p in payloads
    )


def _send(
    handler, chat: bool = False, sample: SampleRequest | None = None, **target
) -> tuple[RequestResult, list[dict]]:
    seen: list[dict] = []

    def recording(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return handler(request)

    async def go():
        transport = httpx.MockTransport(recording)
        async with httpx.AsyncClient(transport=transport) as client:
            api = ApiTarget(url="http://server/v1/x", model="m", chat=chat, **target)
            return await send_request(client, api, sample or SampleRequest("hello", 3, 4))

    return asyncio.run(go()), seen


def test_client_times_each_text_chunk_and_takes_the_servers_token_count():
    body = _sse(
        {"choices": [{"text": "a"}], "usage": None},
        {"choices": [{"text": "b"}], "usage": None},
        {"choices": [{"text": ""}], "usage": None},  # no text: no token arrived
        {"choices": [{"text": "c", "finish_reason": "length"}], "usage": None},
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}},
        b"[DONE]",
    )
    result, seen = _send(lambda request: httpx.Response(200, content=body), ignore_eos=True)
    assert result.success and result.error == ""
    assert result.generated_text == "abc"
    assert len(result.itl) == 2 and result.output_tokens == 4
    assert result.latency >= result.ttft > 0
    assert seen[0]["prompt"] == "hello" and seen[0]["max_tokens"] == 4 and seen[0]["stream"] is True
    assert seen[0]["ignore_eos"] is True and seen[0]["stream_options"] == {"include_usage": True}


def test_chat_client_reads_delta_content_and_sends_one_user_message():
    body = _sse(
        {"choices": [{"delta": {"role": "assistant", "content": "Hi"}}]},
        {"choices": [{"delta": {"content": " there"}}]},
        b"[DONE]",
    )
    result, seen = _send(lambda request: httpx.Response(200, content=body), chat=True, sampling={"top_k": 5})
    assert result.success and result.generated_text == "Hi there"
    assert result.output_tokens == 2  # no usage chunk: one token a chunk
    assert seen[0]["messages"] == [{"role": "user", "content": "hello"}]
    assert seen[0]["max_completion_tokens"] == 4 and seen[0]["top_k"] == 5


def test_client_records_an_http_error_with_the_servers_message():
    error = {
        "error": {"message": "This model's maximum context length is 8 tokens.", "type": "BadRequestError"}
    }
    result, _ = _send(lambda request: httpx.Response(400, json=error))
    assert not result.success
    assert result.error == "HTTP 400: This model's maximum context length is 8 tokens."


def test_client_records_an_error_event_in_the_stream():
    body = _sse(
        {"choices": [{"text": "a"}]}, {"error": {"message": "decode worker lost", "code": 500}}, b"[DONE]"
    )
    result, _ = _send(lambda request: httpx.Response(200, content=body))
    assert not result.success and "decode worker lost" in result.error


def test_client_records_a_stream_without_tokens_and_a_refused_connection():
    result, _ = _send(lambda request: httpx.Response(200, content=_sse(b"[DONE]")))
    assert not result.success and "without a token" in result.error

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    result, _ = _send(refuse)
    assert not result.success and result.error.startswith("ConnectError")


def test_client_sends_the_schema_as_response_format_on_chat_and_structured_outputs_on_completions():
    body = _sse({"choices": [{"text": "{}", "delta": {"content": "{}"}}]}, b"[DONE]")
    sample = SampleRequest("a point?", 3, 16, json_schema=POINT)
    _, (chat,) = _send(lambda request: httpx.Response(200, content=body), chat=True, sample=sample)
    assert chat["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": POINT},
    }
    assert "structured_outputs" not in chat
    _, (completion,) = _send(lambda request: httpx.Response(200, content=body), sample=sample)
    assert completion["structured_outputs"] == {"json": POINT} and "response_format" not in completion
    _, (free,) = _send(lambda request: httpx.Response(200, content=body), chat=True)
    assert "response_format" not in free and "structured_outputs" not in free
