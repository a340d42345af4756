"""`pdserve`: one console script, one subcommand per job.

Each subcommand lives in its own module, imported only when that subcommand runs (so
`pdserve router` never imports torch). The module provides `register(subparsers) -> None`,
which adds the subcommand's parser and sets `func`, a callable(args) -> exit status.
`pdserve -h` lists every subcommand from the table below without importing any of them.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass

from common.config.arg_parser import PdserveArgumentParser


@dataclass(frozen=True)
class Subcommand:
    module: str
    help: str


SUBCOMMANDS: dict[str, Subcommand] = {
    "serve": Subcommand(
        "pdserve.cli.serve",
        "Start a router, a prefill and a decode worker on this machine (OpenAI-compatible API server).",
    ),
    "router": Subcommand("router.cli", "Start the OpenAI-compatible router in front of the workers."),
    "prefill": Subcommand("prefill_worker.cli", "Start a prefill worker."),
    "decode": Subcommand("decode_worker.cli", "Start a decode worker."),
    "chat": Subcommand("pdserve.cli.chat", "Generate chat completions via the running API server."),
    "complete": Subcommand(
        "pdserve.cli.complete",
        "Generate text completions based on the given prompt via the running API server.",
    ),
    "bench": Subcommand("pdserve.cli.bench", "pdserve bench subcommands (serving and throughput benchmarks)."),
    "collect-env": Subcommand("pdserve.cli.collect_env", "Start collecting environment information."),
    "run-batch": Subcommand("pdserve.cli.run_batch", "Run batch prompts and write results to file."),
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
        raise RuntimeError(f"{SUBCOMMANDS[args.subcommand].module}.register() did not set func")
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        return 130


def _register(command: str, sub: Subcommand, subparsers: object) -> int | None:
    """Import the subcommand's module and let it add its parser; an exit status if it cannot."""
    try:
        present = importlib.util.find_spec(sub.module) is not None
    except ModuleNotFoundError:
        present = False
    if not present:
        print(f"pdserve {command}: not available in this build yet", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(sub.module)
    except ModuleNotFoundError as e:
        print(
            f"pdserve {command}: needs the Python package {e.name!r}, which is not installed; "
            "install it (pip install it, or pip install -e . in the repository)",
            file=sys.stderr,
        )
        return 1
    module.register(subparsers)
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
