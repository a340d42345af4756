"""`pdserve bench warm-start`: its command line, what it reads from the workers' output (the
very lines the warm-up writes), its table, and one real cold-then-warm run of `pdserve serve`
on CPU with a tiny model, warm-up on."""

from __future__ import annotations

import json

import pytest

from common.engine.warmup import KernelFirstUses, WarmupReport, WarmupStep
from pdserve.bench.warm_start import (
    RunResult,
    parse_runs,
    prompt_ids,
    read_worker_output,
    results_table,
    serve_flags,
)
from pdserve.cli.main import main
from tests.tiny_llama import TINY_HF_SHAPE


def bench_args(argv: list[str]):
    from common.config.arg_parser import PdserveArgumentParser
    from pdserve.cli import bench

    parser = PdserveArgumentParser(prog="pdserve")
    bench.register(parser.add_subparsers(dest="subcommand"))
    return parser.parse_args(["bench", "warm-start", *argv])


def test_the_flags_after_the_separator_go_to_serve_untouched():
    args = bench_args(["--num-requests", "3", "--", "--model", "/m", "--max_model_len", "4k",
                       "--kv-transfer-config.kv_role", "kv_both", "--num-requests", "9"])  # fmt: skip
    assert args.num_requests == 3
    assert serve_flags(args.serve_args) == [
        "--model", "/m", "--max_model_len", "4k", "--kv-transfer-config.kv_role", "kv_both", "--num-requests", "9",
    ]  # fmt: skip
    assert serve_flags(bench_args([]).serve_args) == []


def test_runs_are_named_and_a_warm_run_needs_one_before_it():
    assert parse_runs("cold,warm") == ["cold", "warm"]
    assert parse_runs("no-warmup, cold ,warm") == ["no-warmup", "cold", "warm"]
    for bad in ("warm", "cold,hot", ""):
        with pytest.raises(ValueError, match="--runs"):
            parse_runs(bad)
    assert main(["bench", "warm-start", "--runs", "warm"]) == 2


def test_prompts_have_their_length_and_share_no_first_block():
    prompts = [prompt_ids(i, 40) for i in range(9)]
    assert all(len(p) == 40 for p in prompts)
    assert len({tuple(p[:16]) for p in prompts}) == 9
    assert prompt_ids(3, 40) == prompts[3]


def test_the_workers_warm_up_and_late_compile_lines_are_read(caplog):
    steps = [WarmupStep("prefill", ())] * 3
    lines = [
        "pdserve decode worker decode-1 ready at tcp://127.0.0.1:1",
        "2026-01-01 INFO decode common.worker.run_worker: " + WarmupReport(steps, 12.34, 57).summary(),
        "2026-01-01 INFO prefill common.worker.run_worker: " + WarmupReport(steps, 0.5, None).summary(),
    ]
    watcher = KernelFirstUses(log_each=True)
    with caplog.at_level("WARNING"):
        watcher(fn=None, repr="_prefill_kernel[...]")  # as Triton calls it on a first use
        watcher(fn=None, repr="_decode_split_kernel[...]")
    lines += [record.getMessage() for record in caplog.records]
    assert read_worker_output("\n".join(lines)) == ([12.3, 0.5], [57], 2)
    assert read_worker_output("pdserve serve: ready") == ([], [], 0)


def test_the_table_puts_each_run_on_a_row():
    runs = [
        RunResult("cold", 41.25, [2.6, 0.061, 0.059, 0.07], [30.5, 28.0], [120], 0),
        RunResult("warm", 12.0, [0.066, 0.060, 0.062], [], [], 3),
    ]
    table = results_table(runs).splitlines()
    assert table[0].startswith("| run | ready s | warm-up s | first TTFT ms")
    assert table[2] == "| cold | 41.2 | 30.5/28.0 | 2600 | 61 | 42.62 | 0 |"
    # a run without a warm-up has nobody counting first runs: the table says so, not 0
    assert table[3] == "| warm | 12.0 | - | 66 | 61 | 1.08 | not counted |"
    assert runs[0].to_dict()["median_ttft_s"] == pytest.approx(0.061)


@pytest.fixture
def tiny_model_folder(tmp_path, hf_smollm2_tokenizer):
    """A two-layer Llama with the embedded model's tokenizer, for --load-format dummy."""
    folder = tmp_path / "tiny"
    hf_smollm2_tokenizer.save_pretrained(str(folder))
    config = {"architectures": ["LlamaForCausalLM"], **TINY_HF_SHAPE, "vocab_size": len(hf_smollm2_tokenizer),
              "max_position_embeddings": 512, "bos_token_id": 1, "eos_token_id": 2}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_cold_then_warm_run_of_pdserve_serve_on_cpu(tiny_model_folder, tmp_path, capsys):
    out = tmp_path / "warm-start.json"
    status = main([
        "bench", "warm-start", "--num-requests", "2", "--prompt-len", "24", "--max-tokens", "2",
        "--json", str(out), "--log-dir", str(tmp_path / "logs"), "--",
        "--model", str(tiny_model_folder), "--load-format", "dummy", "--dtype", "float32", "--device", "cpu",
        "--max-model-len", "256", "--max-num-seqs", "4", "--max-num-batched-tokens", "64",
        "--num-prefill-workers", "0", "--warmup",
    ])  # fmt: skip
    assert status == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report["device"] == "cpu"
    assert [r["name"] for r in report["runs"]] == ["cold", "warm"]
    for run in report["runs"]:
        assert run["time_to_ready_s"] > 0 and len(run["ttfts_s"]) == 3
        assert len(run["warmup_s"]) == 1  # the one worker warmed up (--warmup) before ready
        assert run["kernels_compiled_while_serving"] == 0
    assert "| cold |" in capsys.readouterr().out
    assert len(list((tmp_path / "logs").iterdir())) == 2
