"""`pdserve serve` as a launcher: its parser is the router's and the engine's own flags
composed, each flag once; which flags go to the workers and which to the router; and a
start that fails stops with a clear message and no process left behind. (The whole
system started by it is tested in tests/e2e/.)"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import pytest

from common.config.arg_parser import PdserveArgumentParser
from common.config.engine_args import add_engine_args, engine_config_from_args
from common.worker.worker_args import add_worker_args
from pdserve.cli import serve
from pdserve.cli.serve import router_argv, router_env, worker_argv
from router.cli import add_router_args


def _serve_parser() -> argparse.ArgumentParser:
    parser = PdserveArgumentParser(prog="pdserve")
    serve.register(parser.add_subparsers(dest="subcommand"))
    return parser._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]


def _parsed(argv: list[str]) -> argparse.Namespace:
    parser = PdserveArgumentParser(prog="pdserve")
    serve.register(parser.add_subparsers(dest="subcommand"))
    return parser.parse_args(["serve", *argv])


def _options(add_args) -> dict[str, argparse.Action]:
    parser = PdserveArgumentParser(prog="x", add_help=False)
    add_args(parser)
    return {s: a for a in parser._actions for s in a.option_strings}


def _flags(add_args) -> set[str]:
    """Each option's name (its first option string), as --help lists it."""
    return {a.option_strings[0] for a in _options(add_args).values()}


def _parse_as_child(add_args, argv: list[str]) -> argparse.Namespace:
    parser = PdserveArgumentParser(prog="child")
    add_args(parser)
    return parser.parse_args(argv)


def test_workers_get_every_engine_flag_and_none_of_serves_or_the_routers_own():
    argv = [
        "--num-prefill-workers", "2", "--dtype", "float32", "--port", "9000", "--served-model-name", "a", "b",
        "--api_key=k", "--kv-transfer-config.kv_load_failure_policy", "recompute", "--local-prefill-threshold",
        "64", "--enable-prompt-tokens-details", "--max-model-len", "2k",
    ]  # fmt: skip
    assert worker_argv(_parsed(argv)) == [
        "--max-model-len", "2000", "--served-model-name", "a", "b", "--dtype", "float32",
        "--kv-transfer-config", '{"kv_load_failure_policy": "recompute"}',
    ]  # fmt: skip


def test_serve_help_lists_every_router_and_engine_flag_exactly_once(capsys):
    parser = PdserveArgumentParser(prog="pdserve")
    serve.register(parser.add_subparsers(dest="subcommand"))
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["serve", "--help"])
    assert exit_.value.code == 0
    # an option's entry starts its line, after the usage: "  --api-key KEY [KEY ...]  If given..."
    entries = [
        line.split()[0].rstrip(",") for line in capsys.readouterr().out.splitlines() if line.startswith("  -")
    ]
    router = _flags(add_router_args) - {"--decode-workers", "--prefill-workers", "--router-id"}
    # what serve gives each worker itself
    given_by_serve = {"--worker-address", "--worker-id", "--metrics-port", "--metrics-host", "--ready-file"}
    engine = _flags(lambda p: add_worker_args(p, "decode")) - given_by_serve - {"--log-level"}
    for flag in sorted(router | engine):
        assert entries.count(flag) == 1, f"{flag} is listed {entries.count(flag)} times in serve --help"
    assert len(entries) == len(set(entries))


def test_every_flag_is_declared_once_in_serves_parser():
    strings = [s for a in _serve_parser()._actions for s in a.option_strings]
    assert len(strings) == len(set(strings))


def test_a_flag_help_is_the_routers_own_object():
    serves = {s: a for a in _serve_parser()._actions for s in a.option_strings}
    routers = _options(add_router_args)
    taken = set(routers) - {"--decode-workers", "--prefill-workers", "--router-id", "--registry"}
    assert {"--api-key", "--routing-weights", "--max-model-len", "--cluster-secret-file"} <= taken
    for flag in taken:  # the router's own flags and the model flags it shares with the workers
        assert serves[flag].help is routers[flag].help, flag
    workers = _options(lambda p: add_worker_args(p, "decode"))
    for flag in set(workers) & set(serves):  # add_engine_args and add_registry_args, as the workers
        assert (serves[flag].help, serves[flag].default) == (workers[flag].help, workers[flag].default), flag


def test_the_routers_argv_carries_its_flags_and_the_workers_argv_none_of_them():
    args = _parsed(
        ["--max-queue-wait", "7.5", "--routing-weights.prefix_overlap", "3", "--enable-request-id-headers",
         "--metrics-access", "disabled", "--dtype", "float16", "--max-num-seqs", "8", "--model", "/m"]
    )  # fmt: skip
    router = router_argv(args, [], ["tcp://127.0.0.1:2"], 8123)
    parsed = _parse_as_child(add_router_args, router)
    assert parsed.max_queue_wait == 7.5 and parsed.metrics_access == "disabled"
    assert parsed.routing_weights == args.routing_weights and parsed.enable_request_id_headers
    assert parsed.model == "/m" and parsed.decode_workers == ["tcp://127.0.0.1:2"] and parsed.port == 8123
    workers = worker_argv(args)
    router_only = set(_options(add_router_args)) - set(_options(lambda p: add_worker_args(p, "decode")))
    assert not router_only & set(workers)
    config = engine_config_from_args(_parse_as_child(lambda p: add_worker_args(p, "decode"), workers))
    assert (config.dtype, config.max_num_seqs, config.model) == ("float16", 8, "/m")


def test_a_config_file_reaches_both_children_as_values(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("max-model-len: 1k\nlocal-prefill-threshold: 32\nkv-transfer-config:\n  kv_port: 7000\n")
    args = _parsed(["--config", str(path)])
    workers = _parse_as_child(add_engine_args, worker_argv(args))
    assert workers.max_model_len == 1000 and workers.kv_transfer_config.kv_port == 7000
    assert workers.kv_transfer_config.engine_id != args.kv_transfer_config.engine_id  # each worker its own
    router = _parse_as_child(add_router_args, router_argv(args, [], ["tcp://127.0.0.1:2"], 1))
    assert router.local_prefill_threshold == 32 and router.max_model_len == 1000
    assert "--config" not in worker_argv(args)


def test_the_router_gets_its_flags_the_model_flags_and_the_worker_addresses():
    args = _parsed(
        ["--model", "/m", "--served-model-name", "a", "b", "--max-model-len", "2k", "--api-key", "k",
         "--local-prefill-threshold", "64", "--block-size", "32", "--override-generation-config.temperature", "0.5"]
    )  # fmt: skip
    argv = router_argv(args, ["tcp://127.0.0.1:1"], ["tcp://127.0.0.1:2", "tcp://127.0.0.1:3"], 8123)
    pairs = {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--")}
    assert pairs["--port"] == "8123"
    assert pairs["--decode-workers"] == "tcp://127.0.0.1:2,tcp://127.0.0.1:3"
    assert pairs["--prefill-workers"] == "tcp://127.0.0.1:1"
    assert "--api-key" not in argv and router_env(args)["PDSERVE_API_KEY"] == "k"  # not in `ps`
    assert pairs["--local-prefill-threshold"] == "64"
    assert pairs["--model"] == "/m" and pairs["--max-model-len"] == "2000" and pairs["--block-size"] == "32"
    assert argv[argv.index("--served-model-name") + 1 : argv.index("--served-model-name") + 3] == ["a", "b"]
    assert pairs["--override-generation-config"] == '{"temperature": 0.5}'
    assert "--dtype" not in argv  # engine-only flags stay with the workers


def test_a_start_that_fails_says_so_and_leaves_nothing_running(tmp_path):
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pdserve.cli.main",
            "serve",
            "--model",
            str(tmp_path / "missing"),
            "--port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "worker 0 exited with status" in result.stderr
    assert "no such file or folder" in result.stderr  # the worker's own explanation is shown too
    assert time.monotonic() - started < 120
    leftover = subprocess.run(["pgrep", "-f", str(tmp_path / "missing")], capture_output=True, text=True)
    assert leftover.stdout.strip() == ""


def test_xxhash_without_a_shared_seed_stops_serve_before_anything_starts(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHASHSEED", "PDSERVE_CLUSTER_SECRET",
                                                         "PDSERVE_CLUSTER_SECRET_FILE")}  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "pdserve.cli.main", "serve", "--prefix-caching-hash-algo", "xxhash",
         "--model", str(tmp_path / "never-read"), "--port", "0"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert result.returncode == 1
    assert "needs a seed shared by the router and every worker" in result.stderr
    assert "PYTHONHASHSEED" in result.stderr
    assert "worker 0" not in result.stderr  # refused before any child was started
