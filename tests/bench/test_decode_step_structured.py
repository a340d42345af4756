"""`pdserve bench decode-step --structured-outputs` on the CPU: a tiny model with the
embedded model's vocabulary, every sequence under a JSON schema, and the figures written
(the GPU numbers come from the same code on a GPU; docs/benchmarks.md)."""

from __future__ import annotations

import json

from pdserve.cli.main import main

TINY = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 49152,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
}


def test_the_constrained_step_is_timed_beside_the_free_one(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY))
    out = tmp_path / "step.json"
    argv = [
        "bench", "decode-step", "--device", "cpu", "--model-config", str(config), "--dtype", "float32",
        "--batch-sizes", "3", "--context-len", "24", "--engine-steps", "8", "--rep-ms", "20", "--no-hf",
        "--structured-outputs", "--json", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    figures = json.loads(out.read_text())
    (row,) = figures["structured_outputs"]
    assert row["batch"] == 3 and row["vocab_size"] == 49152
    assert row["free_ms"] > 0 and row["constrained_ms"] > 0 and row["mask_fill_ms"] > 0
    engine = figures["structured_outputs_engine"]
    assert [r["constrained"] for r in engine] == [0, 2, 3]  # none, half (rounded), all
    assert all(r["step_ms"] > 0 for r in engine)
    printed = capsys.readouterr().out
    assert "every sequence under a JSON schema" in printed and "whole engine" in printed
