"""`pdserve bench decode-step` on a mixture-of-experts model and on fp8 weights, on the CPU:
each step against the floor of the bytes it must read (the experts its tokens touch, the
fp8 linears at their bytes), the all-experts floor beside it, and the experts the tokens
really picked; its diagnostics leave out what has no dense Linear and say so; the fused
small-batch path is never given a packed weight. (The GPU figures come from the same code.)"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from common.attention.backend_select import get_attention_backend
from common.models import fp8_weights, llama
from common.models.fp8_weights import Fp8Weight
from common.models.llama import LlamaForCausalLM
from common.models.weights_dummy import fill_dummy_weights
from common.models.weights_fp8 import quantize_linears
from pdserve.bench.decode_step.diagnostics import _weights_by_kind
from pdserve.bench.decode_step.moe_routing import measured_experts_touched
from pdserve.bench.decode_step.report import StepRow, step_table
from pdserve.bench.dummy_model import read_model_config
from pdserve.bench.model_costs import ModelCosts
from pdserve.cli.main import main
from tests.tiny_llama import tiny_config

TINY_MOE = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_experts": 16,
    "num_experts_per_tok": 4,
    "norm_topk_prob": True,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 512,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1e6,
}
TINY_DENSE = {k: v for k, v in TINY_MOE.items() if "expert" not in k and k != "norm_topk_prob"}
TINY_DENSE["architectures"] = ["LlamaForCausalLM"]


def _run(tmp_path, config: dict, *extra: str) -> dict:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "step.json"
    argv = [
        "bench", "decode-step", "--device", "cpu", "--model-config", str(path), "--dtype", "float32",
        "--batch-sizes", "1,8", "--context-len", "16", "--engine-steps", "4", "--rep-ms", "10",
        "--json", str(out), *extra,
    ]  # fmt: skip
    assert main(argv) == 0
    return json.loads(out.read_text())


def test_a_moe_step_is_set_against_the_experts_its_tokens_touch_and_against_all(tmp_path, capsys):
    figures = _run(tmp_path, TINY_MOE, "--num-layers", "2", "--no-hf")
    costs = ModelCosts.from_config(read_model_config(str(tmp_path / "config.json"), num_layers=2))
    bandwidth = figures["copy_TBps"] * 1e12
    kv = 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 heads of 16 dims, fp32
    for row in figures["rows"]:
        b = row["batch"]
        assert row["experts_uniform"] == pytest.approx(16 * (1 - (1 - 4 / 16) ** b))
        assert 4 <= row["experts_measured"] <= 16
        weights = costs.decode_weight_bytes(b, 4)
        every = costs.decode_weight_bytes(b, 4, experts_read=16)
        assert row["weight_gb"] == pytest.approx(weights / 1e9)
        assert row["floor_ms"] == pytest.approx((weights + b * 16 * kv) / bandwidth * 1e3)
        assert row["all_experts_floor_ms"] == pytest.approx((every + b * 16 * kv) / bandwidth * 1e3)
    one = figures["rows"][0]
    assert one["experts_uniform"] == pytest.approx(4) and one["experts_measured"] == 4  # k, exactly
    printed = capsys.readouterr().out
    assert "(2 layers)" in printed and "E (1 - (1 - k/E)^B) a layer" in printed
    row = printed.rstrip().splitlines()[-2]
    assert row.startswith("| 1 | 16 |") and "| 4.0 / 4.0 |" in row


def test_an_fp8_step_is_set_against_the_bytes_fp8_weights_take(tmp_path, capsys):
    figures = _run(tmp_path, TINY_DENSE, "-q", "fp8")
    costs = ModelCosts.from_config(read_model_config(str(tmp_path / "config.json")))
    for row in figures["rows"]:
        assert row["weight_gb"] == pytest.approx(
            costs.decode_weight_bytes(row["batch"], 4, fp8_linears=True) / 1e9
        )
        assert row["all_experts_floor_ms"] is None and row["experts_uniform"] is None
    printed = capsys.readouterr().out
    assert "transformers baseline skipped" in printed
    assert "fp8 linears, the rest float32" in printed and "dequantized copy" in printed


@pytest.mark.parametrize(
    ("flags", "switch"),
    [(["--fp8-small-m", "scaled_mm"], False), (["--fp8-small-m", "triton"], True), ([], True)],
)
def test_the_fp8_small_m_path_holds_for_the_whole_run_and_the_switch_is_put_back_after(
    tmp_path, monkeypatch, flags, switch
):
    """scaled_mm or triton for every matmul of the run; left out, triton (serving's default)."""
    monkeypatch.setattr(fp8_weights, "USE_TRITON_FP8_SMALL_M", "as before")
    switch_at_each_matmul = []
    matmul = Fp8Weight.matmul

    def spy(self, x):
        switch_at_each_matmul.append(fp8_weights.USE_TRITON_FP8_SMALL_M)
        return matmul(self, x)

    monkeypatch.setattr(Fp8Weight, "matmul", spy)
    figures = _run(tmp_path, TINY_DENSE, "-q", "fp8", *flags, "--no-hf")
    assert switch_at_each_matmul and set(switch_at_each_matmul) == {switch}
    assert fp8_weights.USE_TRITON_FP8_SMALL_M == "as before"
    assert all(row["fp8_triton_graph_ms"] is None for row in figures["rows"])  # no graphs on the CPU


def test_fp8_small_m_other_than_scaled_mm_asks_for_fp8_weights(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY_DENSE))
    argv = ["bench", "decode-step", "--device", "cpu", "--model-config", str(path), "--fp8-small-m", "both"]
    assert main(argv) == 2
    assert "pass -q fp8" in capsys.readouterr().err


def test_the_table_names_the_fp8_path_and_puts_the_triton_replay_in_its_own_column():
    row = StepRow(
        batch=1, context=1024, graph_ms=7.06, eager_ms=9.0, engine_ms=7.5, floor_ms=2.72,
        weight_gb=8.036, kv_gb=0.134, fp8_triton_graph_ms=3.25,
    )  # fmt: skip
    args = SimpleNamespace(
        model_config="llama-3-8b", num_layers=None, dtype="bfloat16", quantization="fp8",
        kv_cache_dtype="auto", fp8_small_m="both",
    )  # fmt: skip
    text = step_table([row], 3e12, "NVIDIA H100 80GB HBM3", args)
    assert "fp8 matmuls of at most 16 rows through torch._scaled_mm; the fp8 Triton small-M column" in text
    header, cells = (line.split("|") for line in text.splitlines() if line.startswith("| "))
    assert cells[header.index(" graph ms, fp8 Triton small-M ")].strip() == "3.250"


def _tiny_model(**overrides) -> LlamaForCausalLM:
    model = LlamaForCausalLM(tiny_config(**overrides), get_attention_backend("cpu"))
    fill_dummy_weights(model, seed=0)
    return model


MOE = dict(architecture="Qwen3MoeForCausalLM", qk_norm=True, num_experts=8, num_experts_per_tok=2,
           moe_intermediate_size=16, norm_topk_prob=True)  # fmt: skip


def test_the_per_weight_tables_leave_out_experts_and_take_fp8_weights_apart():
    kinds, packed, notes = _weights_by_kind(_tiny_model(**MOE), with_lm_head=True)
    assert sorted(kinds) == ["lm_head", "o_proj", "qkv_proj"] and packed == {}
    assert any("mixture-of-experts" in note and "moe-kernel" in note for note in notes)
    model = _tiny_model()
    quantize_linears(model)
    kinds, packed, notes = _weights_by_kind(model, with_lm_head=True)
    assert list(kinds) == ["lm_head"]  # the LM head stays in the dtype
    assert sorted(packed) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"] and notes == []
    qkv = model.layers[0].self_attn.qkv_proj.packed
    assert packed["qkv_proj"][0] is qkv and qkv.nbytes() == qkv.weight.numel() + 4 * qkv.out_features


def test_the_experts_counted_are_the_distinct_ones_the_routing_picks():
    model = _tiny_model(**MOE)
    ids = torch.arange(6)
    x = model.embed(ids)
    blocks = [layer.mlp for layer in model.layers]
    forward = lambda: [block(x) for block in blocks]  # noqa: E731
    seen = []
    for block in blocks:
        logits = torch.nn.functional.linear(x, block.router_weight)
        seen.append(len(set(logits.topk(2, dim=-1).indices.flatten().tolist())))
    assert measured_experts_touched(model, forward) == pytest.approx(sum(seen) / len(seen))


def test_the_experts_are_counted_on_the_layer_by_layer_path_and_the_switch_put_back(monkeypatch):
    """The fused small-batch layer (the default on CUDA) calls no SparseMoeBlock.forward to
    count in: the counting forward runs with it off."""
    from common.models import layers

    model = _tiny_model(**MOE)
    x = model.embed(torch.arange(3))
    monkeypatch.setattr(layers, "FUSE_SMALL_BATCH_QWEN3", "on")
    during = []

    def forward():
        during.append(layers.FUSE_SMALL_BATCH_QWEN3)
        return [layer.mlp(x) for layer in model.layers]

    assert measured_experts_touched(model, forward) > 0
    assert during == [False] and layers.FUSE_SMALL_BATCH_QWEN3 == "on"


def test_the_fused_small_batch_path_is_refused_to_a_model_with_packed_weights(monkeypatch):
    sentinel = object()
    monkeypatch.setattr(llama, "small_batch_kernels", lambda x, qwen3_or_experts=False: sentinel)
    model = _tiny_model()
    x = torch.zeros(1, model.config.hidden_size)
    assert model._small_batch_kernels(x) is sentinel
    quantize_linears(model)
    assert model._small_batch_kernels(x) is None


def test_try_takes_the_moe_switches_and_refuses_a_module_it_cannot_set():
    from pdserve.bench.decode_step.step_bench import parse_switches

    assert parse_switches("moe.USE_SMALL_BATCH_MOE=True,fp8.USE_TRITON_FP8_SMALL_M=False") == {
        "moe.USE_SMALL_BATCH_MOE": True,
        "fp8.USE_TRITON_FP8_SMALL_M": False,
    }
    with pytest.raises(SystemExit, match="MODULE one of layers, kernels, tiles, decode, fp8, moe"):
        parse_switches("engine.ASYNC=True")
