"""--registry on the router, the workers and `pdserve serve`: accepted, checked, passed on."""

from __future__ import annotations

import subprocess
import sys

import pytest

from common.config.arg_parser import PdserveArgumentParser
from common.worker.worker_args import add_worker_args, worker_options_from_args
from pdserve.cli.serve import router_argv, worker_argv
from router.cli import add_router_args, config_from_args
from router.config import RouterConfig
from tests.harness.stack import REPO

URL = "redis://10.0.0.2:6379/1"


def test_a_router_needs_decode_workers_or_a_registry():
    with pytest.raises(ValueError, match="--registry redis://HOST:PORT/DB"):
        RouterConfig().validate()
    RouterConfig(registry=URL).validate()
    with pytest.raises(ValueError, match="not a Redis URL"):
        RouterConfig(registry="10.0.0.2:6379").validate()


def test_the_router_flag_reaches_its_config():
    parser = PdserveArgumentParser(prog="pdserve router")
    add_router_args(parser)
    config, _ = config_from_args(parser.parse_args(["--registry", URL]))
    assert config.registry == URL and config.decode_workers == []


def test_the_worker_flags_reach_its_options():
    parser = PdserveArgumentParser(prog="pdserve decode")
    add_worker_args(parser, "decode")
    options = worker_options_from_args(parser.parse_args(["--registry", URL, "--registry-ttl", "4.5"]))
    assert options.registry == URL and options.registry_ttl_s == 4.5
    defaults = worker_options_from_args(parser.parse_args([]))
    assert defaults.registry is None and defaults.registry_ttl_s == 10.0


@pytest.mark.parametrize(
    "args, complaint",
    [
        (
            ["--registry", "localhost:6379"],
            "argument --registry: --registry 'localhost:6379' is not a Redis URL",
        ),
        (["--registry", URL, "--registry-ttl", "0.5"], "the TTL must be at least 1 second"),
    ],
)
def test_a_bad_worker_flag_is_one_line(args, complaint):
    result = subprocess.run(
        [sys.executable, "-m", "pdserve.cli.main", "decode", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and complaint in result.stderr and len(result.stderr.splitlines()) == 1


def test_serve_passes_the_registry_to_its_workers_and_its_router():
    from pdserve.cli.serve import register

    parser = PdserveArgumentParser(prog="pdserve")
    register(parser.add_subparsers())
    given = ["--registry", URL, "--registry-ttl", "5", "--max-model-len", "512"]
    args = parser.parse_args(["serve", *given])
    assert worker_argv(args) == ["--registry", URL, "--registry-ttl", "5.0", "--max-model-len", "512"]
    router = router_argv(args, ["tcp://127.0.0.1:1"], ["tcp://127.0.0.1:2"], 8000)
    assert router[router.index("--registry") + 1] == URL and "--registry-ttl" not in router
