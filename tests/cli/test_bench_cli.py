"""`pdserve bench` names every benchmark, gives each a help page, refuses a missing one with
exit status 2, and lists and parses them without loading torch."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from pdserve.cli.bench import BENCHMARKS
from pdserve.cli.main import main

EVERY_BENCHMARK = [
    "serve",
    "kernels",
    "lora-kernels",
    "moe-kernel",
    "decode-step",
    "prefill",
    "roofline",
    "transfer",
    "route",
    "prefix-index",
    "router-overhead",
    "grammar",
    "cpu-throughput",
    "disagg-latency",
    "warm-start",
    "tp-check",
    "make-model",
]


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def test_bench_help_lists_every_benchmark(capsys):
    assert _exit_code(["bench", "-h"]) == 0
    out = capsys.readouterr().out
    assert sorted(BENCHMARKS) == sorted(EVERY_BENCHMARK)
    listed = re.findall(r"^    (\S+)", out, flags=re.MULTILINE)
    assert listed == EVERY_BENCHMARK


@pytest.mark.parametrize("name", EVERY_BENCHMARK)
def test_each_benchmark_has_a_help_page(name, capsys):
    assert _exit_code(["bench", name, "-h"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: pdserve bench {name}")
    assert BENCHMARKS[name].help.split()[0] in out


def test_bench_without_a_benchmark_exits_2(capsys):
    assert _exit_code(["bench"]) == 2
    assert "BENCHMARK" in capsys.readouterr().err


def test_listing_and_parsing_the_benchmarks_leaves_torch_out():
    code = (
        "import contextlib, io, sys\n"
        "from pdserve.cli.main import main\n"
        "for argv in (['bench', '-h'], ['bench', 'serve', '-h'], ['bench', 'route', '-h']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        main(argv)\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False"]
