"""Every `pdserve ...` command line in deploy/ (Kubernetes overlays, compose file) is one
pdserve accepts: parsed by pdserve's own argument parser, its --kv-transfer-config and
--kv-events-config checked by the project's config parsers, as the process would at start."""

from __future__ import annotations

import importlib

import pytest

from common.config.arg_parser import PdserveArgumentParser
from common.config.engine_args import engine_config_from_args
from common.worker.role import kv_transfer_config_for
from pdserve.cli.main import SUBCOMMANDS
from tests.deploy.deploy_files import (
    KUSTOMIZE_DIRS,
    Invocation,
    compose_invocations,
    kubernetes_invocations,
    load_compose,
    render,
)

# Multi-node tensor parallelism (one engine over the pods of a LeaderWorkerSet group)
# needs launch flags pdserve does not have yet; the overlay uses vLLM's names for them.
MULTI_NODE_FLAGS = ("--nnodes", "--node-rank", "--master-addr", "--master-port", "--headless")


def all_invocations() -> list[Invocation]:
    found = compose_invocations(load_compose())
    for name, directory in sorted(KUSTOMIZE_DIRS.items()):
        found += [
            Invocation(f"{name}: {inv.where}", inv.argv) for inv in kubernetes_invocations(render(directory))
        ]
    return found


def _param(inv: Invocation):
    marks = []
    if any(arg.split("=")[0] in MULTI_NODE_FLAGS for arg in inv.argv):
        reason = "pdserve has no multi-node launch flags yet: " + ", ".join(MULTI_NODE_FLAGS)
        marks.append(pytest.mark.xfail(strict=True, raises=pytest.fail.Exception, reason=reason))
    return pytest.param(inv, id=inv.where, marks=marks)


INVOCATIONS = all_invocations()


def parse(argv: list[str]):
    parser = PdserveArgumentParser(prog="pdserve")
    subparsers = parser.add_subparsers(dest="subcommand")
    SUBCOMMANDS[argv[0]].load()(subparsers)
    return parser.parse_args(argv)


def test_deploy_runs_every_role():
    commands = {
        (inv.where.split(":")[0] if ":" in inv.where else "compose", inv.command) for inv in INVOCATIONS
    }
    for where in ("compose", *KUSTOMIZE_DIRS):
        assert {(where, "router"), (where, "prefill"), (where, "decode")} <= commands, where


@pytest.mark.parametrize("inv", [_param(inv) for inv in INVOCATIONS])
def test_pdserve_accepts_the_command_line(inv: Invocation, capsys):
    try:
        args = parse(inv.argv)
    except SystemExit:
        pytest.fail(f"{inv.where}: pdserve {' '.join(inv.argv)}\nrejected: {capsys.readouterr().err}")
    headless = "--headless" in inv.argv  # the other ranks of a multi-node engine: no sockets
    if not headless:
        assert args.registry and args.registry.startswith("redis://"), (
            "every process shares the Redis registry"
        )
    if inv.command == "router":
        from router.cli import config_from_args

        config, _ = config_from_args(args)
        config.validate()
        assert args.host == "0.0.0.0"
        return
    role = importlib.import_module(f"{inv.command}_worker.role")
    role = getattr(role, f"{inv.command.upper()}_ROLE")
    config = engine_config_from_args(args)
    transfer = kv_transfer_config_for(config.kv_transfer_config, role)
    assert transfer.kv_role == {"prefill": "kv_producer", "decode": "kv_consumer"}[inv.command]
    assert transfer.kv_connector == "NixlConnector" and transfer.kv_buffer_device == "cuda"
    if headless:
        return
    events = config.kv_events_config
    assert events is not None and events.enable_kv_cache_events and events.replay_endpoint
    # the worker must be reachable from other pods / containers, not on loopback only
    assert not args.worker_address.startswith("tcp://127."), args.worker_address
    assert args.metrics_host == "0.0.0.0" and args.metrics_port
