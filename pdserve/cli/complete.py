"""`pdserve complete`: text completions from a running server, in the terminal.

    pdserve complete                                  # a prompt a line; Ctrl-D ends it
    pdserve complete --quick "The capital of France is" --max-tokens 20

Each completion streams in as it is generated, on its own line after the prompt. The
prompts are independent (no history). Torch-free.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from pdserve.cli.api_client import ApiClient, ApiError, add_server_args
from pdserve.cli.chat import add_sampling_args, read_line, sampling_body


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "complete",
        help="Generate text completions based on the given prompt via the running API server.",
        description="Complete prompts with the model of a running OpenAI-compatible server "
        "(pdserve serve). Type a prompt and press Enter; the completion streams back. End with Ctrl-D.",
    )
    add_server_args(parser)
    parser.add_argument(
        "-q",
        "--quick",
        default=None,
        metavar="PROMPT",
        help="Complete this one prompt, print the completion and exit. (default: a prompt a line)",
    )
    add_sampling_args(parser)
    parser.set_defaults(func=run)


def complete(client: ApiClient, model: str, prompt: str, sampling: dict[str, Any], out: TextIO) -> str:
    """Stream the completion of `prompt` to `out`; return it."""
    parts: list[str] = []
    try:
        body = {"model": model, "prompt": prompt, **sampling}
        for event in client.stream("/completions", body):
            for choice in event.get("choices") or []:
                piece = choice.get("text")
                if piece:
                    parts.append(piece)
                    out.write(piece)
                    out.flush()
    finally:
        out.write("\n")
        out.flush()
    return "".join(parts)


def run(args: argparse.Namespace) -> int:
    try:
        with ApiClient(args.url, args.api_key) as client:
            model = client.model(args.model_name)
            sampling = sampling_body(args)
            if args.quick is not None:
                complete(client, model, args.quick, sampling, sys.stdout)
                return 0
            return prompt_loop(client, model, sampling, sys.stdin, sys.stdout)
    except ApiError as exc:
        print(f"pdserve complete: {exc}", file=sys.stderr)
        return 1


def prompt_loop(client: ApiClient, model: str, sampling: dict[str, Any], lines: TextIO, out: TextIO) -> int:
    print(f"Using model: {model}", file=out)
    print("Please enter prompt to complete (Ctrl-D to end):", file=out, flush=True)
    while True:
        line = read_line(lines, out)
        if not line:
            out.write("\n")
            return 0
        prompt = line.rstrip("\n")
        if not prompt.strip():
            continue
        try:
            complete(client, model, prompt, sampling, out)
        except ApiError as exc:
            print(f"pdserve complete: {exc}", file=sys.stderr, flush=True)
        except KeyboardInterrupt:
            print("(interrupted)", file=out, flush=True)
