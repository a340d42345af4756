"""`pdserve run-batch --url` against a real `pdserve serve`: every input line gets its
output line, in order, with the server's own answers and refusals."""

from __future__ import annotations

import json

from tests.cli.conftest import API_KEY, MAX_MODEL_LEN
from tests.cli.test_chat_cli import pdserve
from tests.cli.test_complete_cli import direct_completion
from tests.harness.stack import free_port

MODEL = "SmolLM2-135M-Instruct"


def line(custom_id, url, body, method="POST"):
    return json.dumps({"custom_id": custom_id, "method": method, "url": url, "body": body})


def completion(custom_id, **body):
    return line(
        custom_id,
        "/v1/completions",
        {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 10, "temperature": 0, **body},
    )


def chat(custom_id, **body):
    messages = [{"role": "user", "content": "Say hello."}]
    return line(
        custom_id, "/v1/chat/completions", {"messages": messages, "max_tokens": 4, "temperature": 0, **body}
    )


def test_a_batch_runs_against_the_server_line_by_line_in_order(api_server, tmp_path):
    lines = [
        completion("completion"),
        "{not json",
        line("wrong-url", "/v1/embeddings", {"input": "x"}),
        chat("chat"),
        completion("unknown-model", model="gpt-4"),
        completion("too-long", max_tokens=MAX_MODEL_LEN),
        chat("streaming", stream=True),
        "",
        *(completion(f"many-{i}", max_tokens=3) for i in range(4)),
    ]
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("\n".join(lines) + "\n")
    result = pdserve(
        "run-batch", "-i", str(source), "-o", str(out), "--url", api_server.url, "--api-key", API_KEY,
        "--max-concurrency", "3",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    outputs = [json.loads(text) for text in out.read_text().splitlines()]
    assert [o["custom_id"] for o in outputs] == [
        "completion", None, "wrong-url", "chat", "unknown-model", "too-long", "streaming",
        "many-0", "many-1", "many-2", "many-3",
    ]  # fmt: skip
    by_id = {o["custom_id"]: o for o in outputs if o["custom_id"]}

    answer = by_id["completion"]["response"]
    assert answer["status_code"] == 200 and answer["request_id"]
    assert answer["body"]["choices"][0]["text"] == direct_completion(
        api_server.url, "The capital of France is"
    )
    assert by_id["chat"]["response"]["body"]["object"] == "chat.completion"
    assert all(by_id[f"many-{i}"]["response"]["status_code"] == 200 for i in range(4))

    assert outputs[1]["response"] is None and outputs[1]["error"]["code"] == "invalid_json"
    assert by_id["wrong-url"]["response"] is None and by_id["wrong-url"]["error"]["code"] == "invalid_url"
    for custom_id, status in [("unknown-model", 404), ("too-long", 400), ("streaming", 400)]:
        response = by_id[custom_id]["response"]
        assert response["status_code"] == status and response["body"]["error"]["message"]
    assert (
        by_id["unknown-model"]["response"]["body"]["error"]["message"] == "The model `gpt-4` does not exist."
    )


def test_no_server_at_the_url_fails_before_any_line(tmp_path):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text(completion("a") + "\n")
    url = f"http://127.0.0.1:{free_port()}"
    result = pdserve("run-batch", "-i", str(source), "-o", str(out), "--url", url)
    assert result.returncode == 1 and f"cannot reach the server at {url}/v1" in result.stderr
    assert out.read_text() == ""
