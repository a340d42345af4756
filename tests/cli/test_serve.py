"""`pdserve serve` as a launcher: which flags go to the workers and which to the router,
and a start that fails stops with a clear message and no process left behind. (The
whole system started by it is tested in tests/e2e/.)"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from common.config.arg_parser import PdserveArgumentParser
from pdserve.cli.serve import router_argv, router_env, worker_argv


def _parsed(argv: list[str]) -> argparse.Namespace:
    from pdserve.cli import serve

    parser = PdserveArgumentParser(prog="pdserve")
    serve.register(parser.add_subparsers(dest="subcommand"))
    return parser.parse_args(["serve", *argv])


def test_workers_get_every_engine_flag_as_written_and_none_of_serves_own():
    argv = [
        "--num-prefill-workers", "2", "--dtype", "float32", "--port", "9000", "--served-model-name", "a", "b",
        "--api_key=k", "--kv-transfer-config.kv_load_failure_policy", "recompute", "--local-prefill-threshold",
        "64", "--enable-prompt-tokens-details", "--max-model-len", "2k",
    ]  # fmt: skip
    assert worker_argv(argv) == [
        "--dtype", "float32", "--served-model-name", "a", "b", "--kv-transfer-config.kv_load_failure_policy",
        "recompute", "--max-model-len", "2k",
    ]  # fmt: skip


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
