"""`pdserve bench prefill` end to end on the CPU: a tiny dummy model on the real engine, its
prompts chunked by the scheduler's budget, each row's floor from the shared FLOP count at
the matmul rate the run measured, the profile grouped, and the table printed last (the GPU
figures come from the same code on a GPU; docs/benchmarks.md)."""

from __future__ import annotations

import json

import pytest

from pdserve.bench.dummy_model import read_model_config
from pdserve.bench.model_costs import ModelCosts
from pdserve.cli.main import main

TINY = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "max_position_embeddings": 64,  # shorter than the run: the bench makes room
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
}


def test_prefill_is_timed_on_the_engine_against_its_compute_floor(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    out = tmp_path / "prefill.json"
    argv = [
        "bench", "prefill", "--device", "cpu", "--model-config", str(tmp_path), "--prompt-lens", "64,128",
        "--batch-prompts", "3", "--batch-prompt-len", "64", "--max-num-batched-tokens", "64",
        "--warmup", "1", "--repeats", "2", "--matmul-size", "128", "--matmul-tries", "2",
        "--profile", "--profile-top", "5", "--json", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    figures = json.loads(out.read_text())
    assert figures["dtype"] == "float32" and figures["max_num_batched_tokens"] == 64
    rows = figures["rows"]
    assert [(r["prompts"], r["prompt_len"]) for r in rows] == [(1, 64), (1, 128), (3, 64)]
    # the scheduler's budget of 64 tokens a step chunks the 128-token prompt and the 3 x 64
    assert [r["steps"] for r in rows] == [1, 2, 3]
    costs = ModelCosts.from_config(read_model_config(str(tmp_path)))
    rate = figures["matmul_TFLOPs"] * 1e12
    for r in rows:
        assert r["flops"] == costs.prefill_flops(r["prompt_len"], r["prompts"])
        # the rate comes back through TFLOP/s in the JSON: equal to the last few bits
        assert r["floor_ms"] == pytest.approx(r["flops"] / rate * 1e3, rel=1e-12)
        assert 0 < r["min_ms"] <= r["ms"]
        assert r["ratio"] == pytest.approx(r["ms"] / r["floor_ms"], rel=1e-12)
        assert r["mfu"] == pytest.approx(r["floor_ms"] / r["ms"], rel=1e-12)
    groups = figures["profile"]["groups"]
    assert set(groups) == {"matmul", "attention", "norm+rope+act", "other"}
    assert groups["matmul"] > 0

    printed = capsys.readouterr().out
    assert "max_position_embeddings raised from 64 to 129" in printed
    assert "| group | ms | share of wall |" in printed
    table = printed.rstrip().splitlines()[-5:]  # header, rule and one row a shape, last
    assert table[0].startswith("| prompts | tokens each | steps |")
    assert [line.split("|")[1:3] for line in table[2:]] == [
        [" 1 ", " 64 "],
        [" 1 ", " 128 "],
        [" 3 ", " 64 "],
    ]


TINY_MOE = {
    **TINY,
    "architectures": ["MixtralForCausalLM"],
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 3,
}


def test_a_moe_prefill_in_fp8_counts_k_experts_a_token_and_the_fp8_linears_apart(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(TINY_MOE))
    out = tmp_path / "prefill.json"
    argv = [
        "bench", "prefill", "--device", "cpu", "--model-config", str(tmp_path), "--prompt-lens", "64",
        "--batch-prompts", "", "--warmup", "0", "--repeats", "1", "--matmul-size", "128", "--matmul-tries", "1",
        "-q", "fp8", "--num-layers", "2", "--json", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    figures = json.loads(out.read_text())
    assert figures["quantization"] == "fp8" and figures["fp8_matmul_TFLOPs"] is None  # no fp8 matmul on CPU
    (row,) = figures["rows"]
    costs = ModelCosts.from_config(read_model_config(str(tmp_path), num_layers=2))
    assert costs.num_layers == 2 and costs.experts_per_token == 2
    assert row["flops"] == costs.prefill_flops(64)
    assert row["fp8_flops"] == costs.prefill_fp8_flops(64) > 0
    # without an fp8 rate every FLOP counts at the measured one
    assert row["floor_ms"] == pytest.approx(row["flops"] / (figures["matmul_TFLOPs"] * 1e12) * 1e3)
    printed = capsys.readouterr().out
    assert "no fp8 matmul on cpu" in printed and "2 of the config's 3 layers" in printed
