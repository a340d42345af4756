"""`pdserve prefill`: start a prefill worker."""

from __future__ import annotations

import argparse
from typing import Any

DESCRIPTION = (
    "Start a prefill worker: it runs chunked prefill for the prompts routers send it over ZMQ, "
    "answers each with its first token and the kv_transfer_params a decode worker pulls the "
    "KV blocks with, and holds the blocks until then (or until their lease runs out). "
    'Example: pdserve prefill --kv-transfer-config \'{"kv_connector":"NixlConnector","kv_role":"kv_producer"}\'. '
    "Without --kv-transfer-config it uses NixlConnector where nixl is installed, else TcpConnector."
)


def register(subparsers: Any) -> None:
    from common.worker.worker_args import add_worker_args

    parser = subparsers.add_parser("prefill", help="Start a prefill worker.", description=DESCRIPTION)
    add_worker_args(parser, role="prefill")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from common.worker.run_worker import run_worker
    from prefill_worker.role import PREFILL_ROLE

    return run_worker(args, PREFILL_ROLE)
