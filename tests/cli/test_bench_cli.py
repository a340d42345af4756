"""`pdserve bench` names its benchmarks and refuses a missing one with exit status 2."""

from __future__ import annotations

from pdserve.cli.main import main


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def test_bench_help_lists_kernels_and_decode_step(capsys):
    assert _exit_code(["bench", "-h"]) == 0
    out = capsys.readouterr().out
    assert "kernels" in out and "decode-step" in out


def test_bench_without_a_benchmark_exits_2(capsys):
    assert _exit_code(["bench"]) == 2
    assert "BENCHMARK" in capsys.readouterr().err
