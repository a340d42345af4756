"""`pdserve chat` against a real `pdserve serve`: --quick, the interactive loop fed on
stdin, the history and system prompt it sends, and its errors."""

from __future__ import annotations

import io
import subprocess
import sys

import httpx

from pdserve.cli.api_client import ApiClient
from pdserve.cli.chat import ChatSession
from tests.cli.conftest import API_KEY
from tests.harness.stack import REPO, free_port

MODEL = "SmolLM2-135M-Instruct"
GREEDY = ["--max-tokens", "12", "--temperature", "0"]


def pdserve(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pdserve.cli.main", *args],
        cwd=REPO,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
    )


def direct_chat(url: str, messages: list[dict]) -> str:
    """The server's greedy answer to `messages`, asked without streaming."""
    response = httpx.post(
        url + "/v1/chat/completions",
        json={"model": MODEL, "messages": messages, "max_tokens": 12, "temperature": 0},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=300,
    )
    response.raise_for_status()
    return response.json()["choices"][0]["message"]["content"]


def test_quick_prints_the_streamed_answer_and_exits(api_server):
    result = pdserve(
        "chat",
        "--url",
        api_server.url,
        "--api-key",
        API_KEY,
        "--quick",
        "What is the capital of France?",
        *GREEDY,
    )
    assert result.returncode == 0, result.stderr
    expected = direct_chat(api_server.url, [{"role": "user", "content": "What is the capital of France?"}])
    assert expected and result.stdout == expected + "\n"


def test_the_system_prompt_and_the_history_go_with_every_message(api_server):
    with ApiClient(api_server.url, API_KEY) as client:
        session = ChatSession(
            client, client.model(), "You are a terse assistant.", {"max_tokens": 12, "temperature": 0}
        )
        assert session.model == MODEL  # the server's first model, none being asked for
        out = io.StringIO()
        first = session.send("My name is Ada.", out)
        second = session.send("What is my name?", out)
    assert out.getvalue() == first + "\n" + second + "\n"
    conversation = [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "What is my name?"},
    ]
    assert session.messages == [*conversation, {"role": "assistant", "content": second}]
    # the server answers the whole conversation exactly as the session got it
    assert second == direct_chat(api_server.url, conversation)
    assert second != direct_chat(api_server.url, conversation[-1:])


def test_the_interactive_chat_answers_each_line_of_stdin_until_it_ends(api_server):
    result = pdserve(
        "chat", "--url", api_server.url + "/v1", "--api-key", API_KEY, *GREEDY,
        stdin="Hello!\n\nName a color.\n",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    first = direct_chat(api_server.url, [{"role": "user", "content": "Hello!"}])
    second = direct_chat(
        api_server.url,
        [
            {"role": "user", "content": "Hello!"},
            {"role": "assistant", "content": first},
            {"role": "user", "content": "Name a color."},
        ],
    )
    assert result.stdout == (
        f"Using model: {MODEL}\nPlease enter a message for the chat model (Ctrl-D to end):\n"
        f"> {first}\n> > {second}\n> \n"  # the blank line gets a new prompt, no request
    )


def test_a_refused_message_is_reported_and_the_conversation_goes_on(api_server):
    too_long = "word " * 1000  # past --max-model-len 512
    result = pdserve(
        "chat", "--url", api_server.url, "--api-key", API_KEY, *GREEDY, stdin=f"{too_long}\nHi\n"
    )
    assert result.returncode == 0
    assert "pdserve chat: the server answered 400" in result.stderr and "context length" in result.stderr
    expected = direct_chat(api_server.url, [{"role": "user", "content": "Hi"}])  # no trace of the refused one
    assert result.stdout.endswith(f"> > {expected}\n> \n")


def test_a_wrong_api_key_says_how_to_give_one(api_server):
    result = pdserve("chat", "--url", api_server.url, "--api-key", "wrong", "--quick", "Hi")
    assert result.returncode == 1
    assert "401" in result.stderr and "--api-key" in result.stderr and "Traceback" not in result.stderr


def test_no_server_at_the_url_is_a_clear_error():
    url = f"http://127.0.0.1:{free_port()}"
    result = pdserve("chat", "--url", url, "--quick", "Hi")
    assert result.returncode == 1
    assert f"cannot reach the server at {url}/v1" in result.stderr and "pdserve serve" in result.stderr
