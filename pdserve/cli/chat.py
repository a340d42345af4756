"""`pdserve chat`: talk to a running server from the terminal.

    pdserve chat                                   # interactive; Ctrl-D (end of input) ends it
    pdserve chat --system-prompt "Answer in French." --url http://10.0.0.5:8000
    pdserve chat --quick "What is the capital of France?"   # one message, one answer

Each answer streams in as it is generated. The whole conversation (the system prompt,
then every message and answer) goes with each new message, so the model sees the
history. A failed request (the server refused it, or went away) is reported and left
out of the history; the conversation goes on. Torch-free.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from pdserve.cli.api_client import ApiClient, ApiError, add_server_args

PROMPT = "> "


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "chat",
        help="Generate chat completions via the running API server.",
        description="Chat with the model of a running OpenAI-compatible server (pdserve serve). "
        "Type a message and press Enter; the answer streams back. End with Ctrl-D.",
    )
    add_server_args(parser)
    parser.add_argument(
        "--system-prompt",
        default=None,
        help="A system message put at the start of the conversation. (default: none; the model's "
        "chat template may add its own)",
    )
    parser.add_argument(
        "-q",
        "--quick",
        default=None,
        metavar="MESSAGE",
        help="Send this one message, print the answer and exit. (default: an interactive chat)",
    )
    add_sampling_args(parser)
    parser.set_defaults(func=run)


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="Most tokens in each answer. (default: the server's, up to the context length)",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="Sampling temperature; 0 is greedy. (default: the server's)",
    )


def sampling_body(args: argparse.Namespace) -> dict[str, Any]:
    return {
        name: getattr(args, name)
        for name in ("max_tokens", "temperature")
        if getattr(args, name, None) is not None
    }


class ChatSession:
    """A conversation with one model: its history and one streamed answer per message."""

    def __init__(
        self, client: ApiClient, model: str, system_prompt: str | None, sampling: dict[str, Any]
    ) -> None:
        self.client = client
        self.model = model
        self.sampling = sampling
        self.messages: list[dict[str, str]] = []
        if system_prompt:
            self.messages.append({"role": "system", "content": system_prompt})

    def send(self, text: str, out: TextIO) -> str:
        """Send `text`, write the answer to `out` as it streams, return it. On ApiError the
        history is as before."""
        self.messages.append({"role": "user", "content": text})
        body = {"model": self.model, "messages": self.messages, **self.sampling}
        parts: list[str] = []
        try:
            for event in self.client.stream("/chat/completions", body):
                for choice in event.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        parts.append(piece)
                        out.write(piece)
                        out.flush()
        except BaseException:  # ApiError, or Ctrl-C in the middle of an answer
            self.messages.pop()
            if parts:
                out.write("\n")
            raise
        out.write("\n")
        out.flush()
        answer = "".join(parts)
        self.messages.append({"role": "assistant", "content": answer})
        return answer


def run(args: argparse.Namespace) -> int:
    try:
        with ApiClient(args.url, args.api_key) as client:
            session = ChatSession(
                client, client.model(args.model_name), args.system_prompt, sampling_body(args)
            )
            if args.quick is not None:
                session.send(args.quick, sys.stdout)
                return 0
            return converse(session, sys.stdin, sys.stdout)
    except ApiError as exc:
        print(f"pdserve chat: {exc}", file=sys.stderr)
        return 1


def converse(session: ChatSession, lines: TextIO, out: TextIO) -> int:
    """The interactive loop: a message a line until the input ends."""
    print(f"Using model: {session.model}", file=out)
    print("Please enter a message for the chat model (Ctrl-D to end):", file=out, flush=True)
    while True:
        line = read_line(lines, out)
        if not line:  # end of input
            out.write("\n")
            return 0
        text = line.rstrip("\n")
        if not text.strip():
            continue
        try:
            session.send(text, out)
        except ApiError as exc:
            print(f"pdserve chat: {exc}", file=sys.stderr, flush=True)
        except KeyboardInterrupt:  # stop this answer, keep the conversation
            print("\n(interrupted)", file=out, flush=True)


def read_line(lines: TextIO, out: TextIO) -> str:
    """The next line after a prompt, with its newline; "" at the end of input. A terminal
    gets input()'s line editing."""
    if lines is sys.stdin and out is sys.stdout and sys.stdin.isatty():
        try:
            return input(PROMPT) + "\n"
        except EOFError:
            return ""
    out.write(PROMPT)
    out.flush()
    return lines.readline()
