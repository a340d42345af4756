"""`pdserve run-batch`: every input line gets its output line, in order, bad ones included."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.config.engine_config import EngineConfig
from common.engine.llm_engine import LLMEngine
from common.engine.outputs import RequestOutput
from common.tokenizer import load_tokenizer
from pdserve.cli.run_batch import run_batch, served_model_of

ROOT = Path(__file__).resolve().parents[2]
MAX_MODEL_LEN = 256
NAME = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def served_engine(smollm2_model, smollm2_source):
    model, model_config = smollm2_model
    engine = LLMEngine.from_config(
        EngineConfig(max_model_len=MAX_MODEL_LEN), model=model, model_config=model_config
    )
    return engine, served_model_of(engine, load_tokenizer(smollm2_source), NAME)


def line(custom_id, url, body, method="POST"):
    return json.dumps({"custom_id": custom_id, "method": method, "url": url, "body": body})


def completion(custom_id, **body):
    return line(
        custom_id, "/v1/completions", {"prompt": "The sky is", "max_tokens": 3, "temperature": 0, **body}
    )


def chat(custom_id, **body):
    messages = [{"role": "user", "content": "Say hello."}]
    return line(
        custom_id, "/v1/chat/completions", {"messages": messages, "max_tokens": 3, "temperature": 0, **body}
    )


def run(served_engine, lines):
    engine, served = served_engine
    results, complete = run_batch(engine, served, lines)
    assert complete and not engine.has_unfinished_requests()
    return results


def test_bad_lines_get_error_lines_in_input_order_and_none_is_dropped(served_engine):
    lines = [
        completion("ok-completion"),
        "{this is not json",
        "[1, 2, 3]",
        json.dumps({"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}),
        line("wrong-method", "/v1/completions", {"prompt": "x"}, method="GET"),
        line("wrong-url", "/v1/embeddings", {"input": "x"}),
        json.dumps({"custom_id": "no-body", "method": "POST", "url": "/v1/completions"}),
        completion("bad-temperature", temperature=-1),
        chat("bad-messages", messages=[{"role": "user"}]),
        chat("unknown-model", model="gpt-4"),
        completion("too-long", max_tokens=MAX_MODEL_LEN),
        chat("streaming", stream=True),
        "",
        chat("ok-chat"),
    ]
    results = run(served_engine, lines)
    assert len(results) == len(lines) - 1  # the blank line is not a request
    assert [r["custom_id"] for r in results] == [
        "ok-completion", None, None, None, "wrong-method", "wrong-url", "no-body", "bad-temperature",
        "bad-messages", "unknown-model", "too-long", "streaming", "ok-chat",
    ]  # fmt: skip
    by_id = {r["custom_id"]: r for r in results if r["custom_id"]}

    # lines that are not requests: no response, an error with a code
    codes = ["invalid_json", "invalid_request", "invalid_request", "invalid_method", "invalid_url"]
    for result, code in zip(results[1:6], codes, strict=True):
        assert result["response"] is None and result["error"]["code"] == code and result["error"]["message"]
    assert "line 2" in results[1]["error"]["message"]

    # requests the API refuses: the API's response, status and error body
    for custom_id, status, param in [
        ("no-body", 400, "body"),
        ("bad-temperature", 400, "temperature"),
        ("bad-messages", 400, "messages"),
        ("unknown-model", 404, "model"),
        ("too-long", 400, "messages"),
        ("streaming", 400, "stream"),
    ]:
        result = by_id[custom_id]
        assert result["error"] is None
        assert result["response"]["status_code"] == status
        error = result["response"]["body"]["error"]
        assert error["code"] == status and error["param"] == param and error["message"]
    assert (
        by_id["unknown-model"]["response"]["body"]["error"]["message"] == "The model `gpt-4` does not exist."
    )
    assert "maximum context length is 256 tokens" in by_id["too-long"]["response"]["body"]["error"]["message"]

    # the good ones around them ran
    assert by_id["ok-completion"]["response"]["status_code"] == 200
    assert by_id["ok-completion"]["response"]["body"]["object"] == "text_completion"
    assert by_id["ok-chat"]["response"]["body"]["object"] == "chat.completion"
    assert by_id["ok-chat"]["response"]["body"]["usage"]["completion_tokens"] == 3


def test_output_lines_have_the_openai_batch_shape(served_engine):
    (result,) = run(served_engine, [chat("one")])
    assert set(result) == {"id", "custom_id", "response", "error"}
    assert result["id"].startswith("batch_req_") and result["error"] is None
    response = result["response"]
    assert set(response) == {"status_code", "request_id", "body"} and response["request_id"]
    body = response["body"]
    assert body["model"] == NAME and body["choices"][0]["message"]["role"] == "assistant"


def test_a_stop_string_ends_the_request_and_its_engine_request(served_engine):
    (free,) = run(served_engine, [completion("free", max_tokens=12)])
    text = free["response"]["body"]["choices"][0]["text"]
    words = text.split()
    assert len(words) >= 3, text
    stop = " " + words[2]
    engine, _ = served_engine
    generated_before = engine.stats().num_generation_tokens
    (stopped,) = run(served_engine, [completion("stopped", max_tokens=12, stop=[stop])])
    choice = stopped["response"]["body"]["choices"][0]
    assert choice["text"] == text[: text.index(stop)]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop
    # the engine stopped generating once the stop string showed up
    assert engine.stats().num_generation_tokens - generated_before < 12


def test_several_prompts_with_n_samples_come_back_as_one_choice_list(served_engine):
    (result,) = run(served_engine, [completion("many", prompt=["The sky is", "Water is"], n=2)])
    choices = result["response"]["body"]["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    # greedy: both samples of a prompt agree
    assert choices[0]["text"] == choices[1]["text"] and choices[2]["text"] == choices[3]["text"]
    assert result["response"]["body"]["usage"]["completion_tokens"] == 12


class _BrokenEngine:
    """An engine whose step fails: run-batch must still answer every line."""

    def __init__(self):
        self.added = []

    def add_request(self, request_id, *args, **kwargs):
        self.added.append(request_id)

    def has_unfinished_requests(self):
        return True

    def step(self):
        raise RuntimeError("device lost")

    def abort_request(self, ids):
        pass


def test_an_engine_failure_answers_every_line_with_a_500(served_engine):
    _, served = served_engine
    engine = _BrokenEngine()
    results, complete = run_batch(engine, served, [completion("a"), "not json", chat("b")])
    assert not complete and len(engine.added) == 2
    assert [r["custom_id"] for r in results] == ["a", None, "b"]
    for result in (results[0], results[2]):
        assert result["response"]["status_code"] == 500
        assert "device lost" in result["response"]["body"]["error"]["message"]
    assert results[1]["error"]["code"] == "invalid_json"


class _FailingRequestEngine(_BrokenEngine):
    """An engine that fails every request it takes, saying why (as a failed KV load does)."""

    def __init__(self):
        super().__init__()
        self.stepped = False

    def has_unfinished_requests(self):
        return not self.stepped

    def step(self):
        self.stepped = True
        return [
            RequestOutput(rid, [], None, True, "abort", None, 4, 0, error="the KV transfer failed")
            for rid in self.added
        ]


def test_a_request_the_engine_fails_gets_a_500_with_the_reason(served_engine):
    _, served = served_engine
    results, complete = run_batch(_FailingRequestEngine(), served, [completion("a")])
    assert complete
    assert results[0]["response"]["status_code"] == 500
    assert "the KV transfer failed" in results[0]["response"]["body"]["error"]["message"]


def _pdserve(*args, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "pdserve.cli.main", "run-batch", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        **kwargs,
    )


def test_a_missing_input_file_is_a_clear_error():
    result = _pdserve("-i", "no/such/file.jsonl", "-o", "-", timeout=120)
    assert result.returncode == 1 and "no/such/file.jsonl" in result.stderr


def test_the_console_script_runs_the_example_batch(tmp_path):
    example = ROOT / "examples" / "batch.jsonl"
    script = Path(sys.executable).with_name("pdserve")
    out = tmp_path / "out.jsonl"
    result = subprocess.run(
        [str(script), "run-batch", "-i", str(example), "-o", str(out), "--max-model-len", "1024"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Running batch" in result.stderr  # the progress bar
    inputs = [json.loads(text) for text in example.read_text().splitlines() if text.strip()]
    outputs = [json.loads(text) for text in out.read_text().splitlines()]
    assert [o["custom_id"] for o in outputs] == [i["custom_id"] for i in inputs]
    statuses = {o["custom_id"]: o["response"]["status_code"] for o in outputs}
    assert statuses.pop("completion-too-long") == 400
    assert set(statuses.values()) == {200}
