"""`pdserve`: one console script, one subcommand per job.

Each subcommand lives in its own module, imported only when that subcommand runs (so
`pdserve router` never imports torch): the table below holds, for each, its help and a
function that imports the module with a plain import statement and returns its
`register(subparsers) -> None`, which adds the subcommand's parser and sets `func`, a
callable(args) -> exit status. `pdserve -h` lists every subcommand from the table
without importing any of them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common.config.arg_parser import PdserveArgumentParser

Register = Callable[[Any], None]
# the packages of this project: a module of theirs that is missing is a subcommand this
# build does not have, not a dependency to install
_OWN_PACKAGES = ("pdserve", "common", "router", "prefill_worker", "decode_worker", "kvtransfer")


@dataclass(frozen=True)
class Subcommand:
    help: str
    load: Callable[[], Register]  # imports the subcommand's module; its register function


def _serve() -> Register:
    from pdserve.cli import serve

    return serve.register


def _router() -> Register:
    from router import cli

    return cli.register


def _prefill() -> Register:
    from prefill_worker import cli

    return cli.register


def _decode() -> Register:
    from decode_worker import cli

    return cli.register


def _chat() -> Register:
    from pdserve.cli import chat

    return chat.register


def _complete() -> Register:
    from pdserve.cli import complete

    return complete.register


def _bench() -> Register:
    from pdserve.cli import bench

    return bench.register


def _collect_env() -> Register:
    from pdserve.cli import collect_env

    return collect_env.register


def _run_batch() -> Register:
    from pdserve.cli import run_batch

    return run_batch.register


SUBCOMMANDS: dict[str, Subcommand] = {
    "serve": Subcommand(
        "Start a router, a prefill and a decode worker on this machine (OpenAI-compatible API server).",
        _serve,
    ),
    "router": Subcommand("Start the OpenAI-compatible router in front of the workers.", _router),
    "prefill": Subcommand("Start a prefill worker.", _prefill),
    "decode": Subcommand("Start a decode worker.", _decode),
    "chat": Subcommand("Generate chat completions via the running API server.", _chat),
    "complete": Subcommand(
        "Generate text completions based on the given prompt via the running API server.", _complete
    ),
    "bench": Subcommand("pdserve bench subcommands (serving and throughput benchmarks).", _bench),
    "collect-env": Subcommand("Start collecting environment information.", _collect_env),
    "run-batch": Subcommand("Run batch prompts and write results to file.", _run_batch),
}


def main(argv: list[str] | None = None) -> int:
    """Run `pdserve ARGV...` and return its exit status (2 for a usage error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    name = next((token for token in argv if not token.startswith("-")), None)
    parser = PdserveArgumentParser(
        prog="pdserve",
        description="pdserve: disaggregated prefill/decode LLM serving with a prefix-aware router.",
    )
    parser.add_argument("-v", "--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(title="subcommands", dest="subcommand")
    for command, sub in SUBCOMMANDS.items():
        if command != name:
            subparsers.add_parser(command, help=sub.help, description=sub.help)
            continue
        status = _register(command, sub, subparsers)
        if status is not None:
            return status
    try:
        args = parser.parse_args(argv)
        if args.subcommand is None:
            parser.error(f"give a subcommand: {', '.join(SUBCOMMANDS)} (see pdserve -h)")
    except SystemExit as e:
        return _exit_status(e.code)
    func = getattr(args, "func", None)
    if func is None:
        raise RuntimeError(f"pdserve {args.subcommand}: its register() did not set func")
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        return 130


def _register(command: str, sub: Subcommand, subparsers: object) -> int | None:
    """Import the subcommand's module and let it add its parser; an exit status if it cannot."""
    try:
        register = sub.load()
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] in _OWN_PACKAGES:
            print(f"pdserve {command}: not available in this build yet", file=sys.stderr)
            return 2
        print(
            f"pdserve {command}: needs the Python package {e.name!r}, which is not installed; "
            "install it (pip install it, or pip install -e . in the repository)",
            file=sys.stderr,
        )
        return 1
    register(subparsers)
    return None


def _exit_status(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pdserve")
    except PackageNotFoundError:
        return "(version unknown: run from a source tree that is not installed; pip install -e .)"


if __name__ == "__main__":
    sys.exit(main())
