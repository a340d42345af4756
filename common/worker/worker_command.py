"""The one shape of the worker subcommands (`pdserve prefill`, `pdserve decode`): a parser
with the engine and worker flags (common/worker/worker_args.py) whose function runs the
shared serving loop with the subcommand's role. Each role's package keeps only its entry
module: the description and how to load its role. Torch-free until a worker starts.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from common.worker.worker_args import add_worker_args

Register = Callable[[Any], None]


def worker_command(role: str, description: str | None, load_role: Callable[[], Any]) -> Register:
    """The register(subparsers) of the subcommand named `role` ("prefill" or "decode");
    `load_role()` imports and returns the role given to run_worker, once the worker starts."""

    def run(args: argparse.Namespace) -> int:
        from common.worker.run_worker import run_worker  # the engine, and torch, from here on

        return run_worker(args, load_role())

    def register(subparsers: Any) -> None:
        parser = subparsers.add_parser(role, help=f"Start a {role} worker.", description=description)
        add_worker_args(parser, role=role)
        parser.set_defaults(func=run)

    return register
