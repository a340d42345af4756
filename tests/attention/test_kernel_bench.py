"""`pdserve bench kernels` end to end at its --smoke size: every kernel checked, a table printed."""

from __future__ import annotations

import argparse
import json

from pdserve.bench.kernels.command import add_kernel_bench_args, run_kernel_bench


def test_kernel_bench_smoke_checks_every_kernel_and_prints_the_table(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_kernel_bench_args(parser)
    path = tmp_path / "rows.json"
    args = parser.parse_args(["--smoke", "--kv-cache-dtypes", "auto", "--json", str(path)])

    assert run_kernel_bench(args) == 0

    printed = capsys.readouterr().out
    assert "ceilings measured in this run" in printed
    result = json.loads(path.read_text())
    kernels = {row["kernel"] for row in result["rows"]}
    assert kernels == {"write_kv", "decode", "decode/unified", "prefill"}
    assert all(row["error"] < 1e-2 and row["time_us"] > 0 for row in result["rows"])
    assert result["ceilings"]["copy_TBps"] > 0
