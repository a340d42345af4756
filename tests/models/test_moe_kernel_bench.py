"""`pdserve bench moe-kernel` end to end at its --tiny size (Triton's interpreter on CPU, which
tests/models/conftest.py switches on): every case checked against the loop, a table printed,
the rows written as JSON; without a CUDA device and without --tiny it refuses, saying why."""

from __future__ import annotations

import argparse
import json

import torch

from pdserve.bench.moe_kernel import TINY_TOKENS, add_moe_kernel_args, run_moe_kernel_bench


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_moe_kernel_args(parser)
    return parser.parse_args(list(argv))


def test_tiny_run_checks_bf16_and_fp8_cases_and_writes_the_table_and_json(tmp_path, capsys):
    path = tmp_path / "rows.json"

    assert (
        run_moe_kernel_bench(_args("--tiny", "--json", str(path), "--warmup-ms", "1", "--rep-ms", "1")) == 0
    )

    printed = capsys.readouterr().out
    assert "| model | weights | T |" in printed and "ceilings measured in this run" in printed
    result = json.loads(path.read_text())
    cases = {(row["weights"], row["tokens"]) for row in result["rows"]}
    assert cases == {(w, int(t)) for w in ("bf16", "fp8") for t in TINY_TOKENS.split(",")}
    assert all(
        row["error"] < 2e-2 and row["fused_eager_us"] > 0 and row["floor_us"] > 0 for row in result["rows"]
    )
    assert result["copy_GBps"] > 0 and result["matmul_TFLOPs"] > 0


if not torch.cuda.is_available():  # the refusal is what a machine without CUDA gets

    def test_without_cuda_only_tiny_runs_and_the_refusal_says_so(capsys):
        assert run_moe_kernel_bench(_args()) == 2
        assert "needs a CUDA device; on CPU only --tiny runs" in capsys.readouterr().err
