"""`pdserve complete` against a real `pdserve serve`: --quick and prompts fed on stdin."""

from __future__ import annotations

import httpx

from tests.cli.conftest import API_KEY
from tests.cli.test_chat_cli import pdserve

MODEL = "SmolLM2-135M-Instruct"
GREEDY = ["--max-tokens", "10", "--temperature", "0"]


def direct_completion(url: str, prompt: str) -> str:
    response = httpx.post(
        url + "/v1/completions",
        json={"model": MODEL, "prompt": prompt, "max_tokens": 10, "temperature": 0},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=300,
    )
    response.raise_for_status()
    return response.json()["choices"][0]["text"]


def test_quick_prints_the_streamed_completion(api_server):
    result = pdserve(
        "complete", "--url", api_server.url, "--api-key", API_KEY, "--model-name", MODEL,
        "--quick", "The capital of France is", *GREEDY,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    expected = direct_completion(api_server.url, "The capital of France is")
    assert expected and result.stdout == expected + "\n"


def test_each_line_of_stdin_is_completed_on_its_own(api_server):
    prompts = ["Water boils at", "def add(a, b):"]
    result = pdserve(
        "complete", "--url", api_server.url, "--api-key", API_KEY, *GREEDY, stdin="\n".join(prompts) + "\n"
    )
    assert result.returncode == 0, result.stderr
    first, second = (direct_completion(api_server.url, p) for p in prompts)
    assert result.stdout == (
        f"Using model: {MODEL}\nPlease enter prompt to complete (Ctrl-D to end):\n> {first}\n> {second}\n> \n"
    )


def test_an_unknown_model_is_the_servers_404_in_one_line(api_server):
    result = pdserve(
        "complete", "--url", api_server.url, "--api-key", API_KEY, "--model", "gpt-4", "-q", "Hi"
    )
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        == "pdserve complete: the server answered 404: The model `gpt-4` does not exist."
    )
