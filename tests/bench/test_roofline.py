"""`pdserve bench roofline`: a serving workload's floor on a toy model and workload small
enough to check by hand, the measured fraction from a `bench serve` result, and the
command measuring the CPU's own rates."""

from __future__ import annotations

import json

import pytest

from pdserve.bench.dummy_model import read_model_config
from pdserve.bench.model_costs import ModelCosts
from pdserve.bench.roofline import Workload, serving_roofline, workload_from_result
from pdserve.cli.main import main
from tests.tiny_llama import tiny_config

# 1152 matmul parameters in the layers, an untied 10 x 8 embedding and LM head, 40 norm
# weights (tests/bench/test_model_costs.py counts them); K/V 16 elements a token
HAND = dict(
    vocab_size=10,
    hidden_size=8,
    intermediate_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=4,
)
HAND_CONFIG_JSON = {
    "architectures": ["LlamaForCausalLM"],
    "max_position_embeddings": 64,
    "torch_dtype": "bfloat16",
    **HAND,
}
# 3 requests of 4 prompt and 3 output tokens, 2 at a time: a wave of 2, then a wave of 1,
# each making 2 decode steps after its prefill's first token
TOY = Workload(input_len=4, output_len=3, num_requests=3, concurrency=2)
PREFILL_FLOPS = 3 * (2 * 1152 * 4 + 4 * 4 * 2 * 2 * (1 + 2 + 3 + 4) + 2 * 80)  # 30048


def test_a_toy_workloads_floor_is_its_prefill_flops_plus_each_decode_steps_bytes():
    costs = ModelCosts.from_config(tiny_config(**HAND))
    roof = serving_roofline(
        costs, TOY, matmul_rate=30048.0, copy_bandwidth=1000.0, bytes_per_param=2, kv_bytes_per_element=2
    )
    assert roof.prefill_flops == PREFILL_FLOPS and roof.prefill_s == 1.0
    # weights a step: (1352 - 80 + 8 x batch) parameters x 2 bytes; K/V: 32 bytes x batch x (4 + s)
    step_bytes = [
        (1272 + 16) * 2 + 32 * 2 * 5,  # wave of 2, step 1: 2896
        (1272 + 16) * 2 + 32 * 2 * 6,  # step 2: 2960
        (1272 + 8) * 2 + 32 * 1 * 5,  # wave of 1: 2720
        (1272 + 8) * 2 + 32 * 1 * 6,  # 2752
    ]
    assert roof.decode_steps == 4 and roof.decode_bytes == sum(step_bytes) == 11328
    assert roof.compute_bound_steps == 0
    assert roof.decode_s == pytest.approx(11.328)
    assert (roof.first_step_ms, roof.last_step_ms) == pytest.approx((2896.0, 2960.0))
    assert roof.output_tokens == 9
    assert roof.output_tok_s == pytest.approx(9 / 12.328)


def test_with_bandwidth_to_spare_every_decode_step_takes_its_flops_time():
    costs = ModelCosts.from_config(tiny_config(**HAND))
    roof = serving_roofline(
        costs, TOY, matmul_rate=30048.0, copy_bandwidth=1e18, bytes_per_param=2, kv_bytes_per_element=2
    )
    # a step of b sequences: 2 x (1152 + 80) x b for the matmuls, 64 x context for attention
    step_flops = [2464 * 2 + 64 * 10, 2464 * 2 + 64 * 12, 2464 + 64 * 5, 2464 + 64 * 6]
    assert roof.compute_bound_steps == 4
    assert roof.decode_s == pytest.approx(sum(step_flops) / 30048.0)


def test_one_output_token_has_no_decode_step():
    costs = ModelCosts.from_config(tiny_config(**HAND))
    one = Workload(input_len=4, output_len=1, num_requests=3, concurrency=2)
    roof = serving_roofline(
        costs, one, matmul_rate=30048.0, copy_bandwidth=1000.0, bytes_per_param=2, kv_bytes_per_element=2
    )
    assert (roof.decode_steps, roof.decode_s, roof.time_s) == (0, 0.0, 1.0)


def test_a_bench_serve_result_gives_the_workload_and_the_measured_throughput(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(HAND_CONFIG_JSON))
    result = {  # the fields of `pdserve bench serve --save-result` this bench reads
        "num_prompts": 3, "completed": 3, "max_concurrency": 2, "total_input_tokens": 12,
        "total_output_tokens": 9, "output_throughput": 0.5,
    }  # fmt: skip
    (tmp_path / "serve.json").write_text(json.dumps(result))
    assert workload_from_result(result) == dict(input_len=4, output_len=3, num_requests=3, concurrency=2)
    out = tmp_path / "roof.json"
    argv = [
        "bench", "roofline", "--model-config", str(config), "--result", str(tmp_path / "serve.json"),
        "--matmul-tflops", str(30048e-12), "--copy-tbps", str(1000e-12), "--json", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    figures = json.loads(out.read_text())
    assert figures["dtype"] == "bfloat16"  # rates given: the dtype a GPU would serve
    assert figures["workload"] == dict(input_len=4, output_len=3, num_requests=3, concurrency=2)
    assert figures["roofline"]["output_tok_s"] == pytest.approx(9 / 12.328)
    assert figures["fraction"] == pytest.approx(0.5 / (9 / 12.328))
    last = capsys.readouterr().out.rstrip().splitlines()[-1]
    assert last.startswith("| 4 / 3 | 3 | 2 |") and last.endswith(f"| 0.5 | {0.5 / (9 / 12.328):.1%} |")


def test_on_cpu_the_command_measures_the_cpus_own_rates(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(HAND_CONFIG_JSON))
    out = tmp_path / "roof.json"
    argv = [
        "bench", "roofline", "--device", "cpu", "--model-config", str(config), "--input-len", "16",
        "--output-len", "4", "--num-prompts", "2", "--max-concurrency", "2", "--measured", "100",
        "--matmul-size", "128", "--matmul-tries", "1", "--json", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    figures = json.loads(out.read_text())
    assert figures["device"] == "cpu" and figures["dtype"] == "float32"
    assert figures["rates"] == {"matmul": "measured", "copy": "measured"}
    assert figures["matmul_TFLOPs"] > 0 and figures["copy_TBps"] > 0
    roof = figures["roofline"]
    assert roof["decode_steps"] == 3 and roof["output_tokens"] == 8
    assert figures["fraction"] == pytest.approx(100 / roof["output_tok_s"])


HAND_MOE = dict(
    HAND,
    architecture="Qwen3MoeForCausalLM",
    qk_norm=True,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    norm_topk_prob=True,
)


def test_a_moe_roofline_reads_the_experts_each_wave_touches_and_fp8_linears_at_their_bytes():
    costs = ModelCosts.from_config(tiny_config(**HAND_MOE))
    rates = dict(matmul_rate=1e9, copy_bandwidth=1000.0, bytes_per_param=2, kv_bytes_per_element=2)
    roof = serving_roofline(costs, TOY, **rates)
    kv = costs.kv_bytes_per_token(2)
    waves = [(2, 5), (2, 6), (1, 5), (1, 6)]  # (sequences, context) of each decode step
    expected = sum(costs.decode_weight_bytes(b, 2) + kv * b * ctx for b, ctx in waves)
    assert roof.decode_bytes == pytest.approx(expected)
    assert roof.prefill_flops == costs.prefill_flops(4, 3)
    fp8 = serving_roofline(costs, TOY, **rates, fp8_linears=True, fp8_matmul_rate=2e9)
    saved = sum(
        costs.decode_weight_bytes(b, 2) - costs.decode_weight_bytes(b, 2, fp8_linears=True) for b, _ in waves
    )
    assert roof.decode_bytes - fp8.decode_bytes == pytest.approx(saved)
    # the fp8 linears' share of the prefill at twice the rate
    fp8_flops = costs.prefill_fp8_flops(4, 3)
    assert fp8.prefill_s == pytest.approx((roof.prefill_flops - fp8_flops) / 1e9 + fp8_flops / 2e9)


def test_the_roofline_command_takes_a_bundled_moe_config_in_fp8(tmp_path):
    out = tmp_path / "roof.json"
    argv = [
        "bench", "roofline", "--model-config", "qwen3-30b-a3b", "-q", "fp8", "--matmul-tflops", "800",
        "--copy-tbps", "3", "--input-len", "1024", "--output-len", "2", "--num-prompts", "1",
        "--max-concurrency", "1", "--json", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    figures = json.loads(out.read_text())
    assert figures["quantization"] == "fp8"
    costs = ModelCosts.from_config(read_model_config("qwen3-30b-a3b"))
    step = costs.decode_weight_bytes(1, 2, fp8_linears=True) + costs.kv_bytes_per_token(2) * 1025
    assert figures["roofline"]["decode_bytes"] == pytest.approx(step)
    assert figures["roofline"]["last_step_ms"] == pytest.approx(step / 3e12 * 1e3)
