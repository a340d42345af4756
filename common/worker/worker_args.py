"""The flags of `pdserve prefill` and `pdserve decode`: every engine flag (vLLM's names,
common/config/engine_args.py) plus the worker-only ones, where the worker listens and
reports, declared here once. Torch-free.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from common.config.arg_parser import PdserveArgumentParser
from common.config.arg_types import choice, int_at_least, registry_url, seconds
from common.config.engine_args import add_engine_args
from common.config.shared_args import add_cluster_secret_arg
from common.registry import DEFAULT_TTL_S

# Where each role listens unless --worker-address says otherwise.
DEFAULT_WORKER_PORTS = {"prefill": 8100, "decode": 8200}
LOG_LEVELS = ("debug", "info", "warning", "error")
_ADDRESS_SCHEMES = ("tcp://", "ipc://")


@dataclass
class WorkerOptions:
    address: str
    worker_id: str | None
    metrics_host: str
    metrics_port: int | None
    ready_file: str | None
    log_level: str
    registry: str | None = None  # redis://HOST:PORT/DB of the worker registry
    registry_ttl_s: float = DEFAULT_TTL_S
    cluster_secret_file: str | None = None  # else $PDSERVE_CLUSTER_SECRET (common/frame_auth.py)


def worker_address(text: str) -> str:
    if not text.startswith(_ADDRESS_SCHEMES):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a ZMQ address; write tcp://HOST:PORT (port 0 picks a free one) or ipc://PATH"
        )
    if text.startswith("tcp://"):
        host, sep, port = text.removeprefix("tcp://").rpartition(":")
        if not sep or not host or not (port.isdigit() or port == "*"):
            raise argparse.ArgumentTypeError(f"{text!r} needs a host and a port: tcp://127.0.0.1:8100")
    return text


def add_worker_args(parser: PdserveArgumentParser, role: str) -> None:
    """Add the engine flags and the worker flags of `role` ("prefill" or "decode")."""
    add_engine_args(parser)
    group = parser.add_argument_group("worker")
    group.add_argument(
        "--worker-address",
        type=worker_address,
        default=f"tcp://127.0.0.1:{DEFAULT_WORKER_PORTS[role]}",
        help="The ZMQ address the worker's ROUTER socket binds; routers connect a DEALER to it. "
        "Port 0 picks a free port (printed at start and written to --ready-file). Use "
        "tcp://0.0.0.0:PORT to accept routers from other hosts.",
    )
    group.add_argument(
        "--worker-id",
        default=None,
        help=f"The id this worker gives in its load reports. (default: {role}-HOSTNAME-PORT)",
    )
    group.add_argument(
        "--metrics-port",
        type=int_at_least(0),
        default=None,
        help="Serve Prometheus metrics (vllm:* names) over HTTP on this port; 0 picks a free port. "
        "Off when not given.",
    )
    group.add_argument(
        "--metrics-host", default="127.0.0.1", help="The address the metrics HTTP server binds."
    )
    group.add_argument(
        "--ready-file",
        default=None,
        help="Once the worker serves, write a JSON file here with its address, worker id, engine "
        "id, metrics port, KV-event endpoints and KV side channel (for launchers and tests).",
    )
    add_registry_args(group)
    add_cluster_secret_arg(group)
    group.add_argument(
        "--log-level", type=choice(LOG_LEVELS), choices=LOG_LEVELS, default="info", help="Logging level."
    )


def add_registry_args(group: Any) -> None:
    """--registry and --registry-ttl (also on `pdserve serve`, which passes them on)."""
    group.add_argument(
        "--registry",
        type=registry_url,
        default=None,
        metavar="redis://HOST:PORT/DB",
        help="Register this worker (role, address, model, engine id, KV-event endpoint, TP size, "
        "load) in this Redis worker registry, renewed by a heartbeat, so routers started with the "
        "same --registry find it. The worker serves on while Redis is down. (default: no registry)",
    )
    group.add_argument(
        "--registry-ttl",
        type=seconds(1.0, inclusive=True, subject="the TTL"),
        default=DEFAULT_TTL_S,
        metavar="SECONDS",
        help="How long the worker's registry record outlives its last heartbeat (the heartbeat "
        "renews it three times per TTL): a worker that dies leaves the routers' pools this long "
        "after. Used with --registry.",
    )


def worker_options_from_args(ns: argparse.Namespace) -> WorkerOptions:
    return WorkerOptions(
        address=ns.worker_address,
        worker_id=ns.worker_id,
        metrics_host=ns.metrics_host,
        metrics_port=ns.metrics_port,
        ready_file=ns.ready_file,
        log_level=ns.log_level,
        registry=ns.registry,
        registry_ttl_s=ns.registry_ttl,
        cluster_secret_file=ns.cluster_secret_file,
    )
