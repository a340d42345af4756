"""`pdserve decode`: start a decode worker."""

from __future__ import annotations

import argparse
from typing import Any

DESCRIPTION = (
    "Start a decode worker: continuous batching of the requests routers send it over ZMQ. A "
    "request with kv_transfer_params pulls the prompt blocks its own prefix cache lacks from the "
    "prefill worker they name, while the running sequences keep decoding; a request without them "
    "is prefilled here. Token ids stream back to the router. "
    'Example: pdserve decode --kv-transfer-config \'{"kv_connector":"NixlConnector","kv_role":"kv_consumer"}\'. '
    "Without --kv-transfer-config it uses NixlConnector where nixl is installed, else TcpConnector."
)


def register(subparsers: Any) -> None:
    from common.worker.worker_args import add_worker_args

    parser = subparsers.add_parser("decode", help="Start a decode worker.", description=DESCRIPTION)
    add_worker_args(parser, role="decode")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from common.worker.run_worker import run_worker
    from decode_worker.role import DECODE_ROLE

    return run_worker(args, DECODE_ROLE)
