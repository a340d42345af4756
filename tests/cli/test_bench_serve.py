"""`pdserve bench serve` against a real `pdserve serve` (the embedded model on CPU, one
prefill and one decode worker): the figures agree with what the server counted, the
decode worker's KV pulls read from its metrics, chat, several rates with charts, a trace
replayed on its times, and failures (a 400 for a prompt over --max-model-len, a server
that is not there) counted, never raised."""

from __future__ import annotations

import json
import time

import pytest

from pdserve.cli.main import main
from tests.harness.stack import ServeStack, alive, free_port, metric

MAX_MODEL_LEN = 256
ENGINE_FLAGS = [
    "--dtype", "float32", "--device", "cpu", "--max-model-len", str(MAX_MODEL_LEN),
    "--num-gpu-blocks-override", "128", "--block-size", "16",
]  # fmt: skip
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def server():
    serve = ServeStack(
        [*ENGINE_FLAGS, "--num-prefill-workers", "1", "--local-prefill-threshold", "0", "--disable-uvicorn-access-log",
         "--worker-health-timeout", "30"]
    )  # fmt: skip
    try:
        serve.ready()
        yield serve
    finally:
        children = serve.children()
        serve.stop()
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.1)


def _bench(url: str, *flags: str) -> int:
    return main(["bench", "serve", "--base-url", url, "--ready-check-timeout-sec", "0", *flags])


def test_figures_match_what_the_server_counted(server, tmp_path, capsys):
    prompt_before = metric(server.url, "vllm:prompt_tokens_total")
    generated_before = metric(server.url, "vllm:generation_tokens_total")
    status = _bench(
        server.url, "--dataset-name", "random", "--random-input-len", "24", "--random-output-len", "6",
        "--num-prompts", "6", "--max-concurrency", "2", "--ignore-eos", "--seed", "1",
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99", "--goodput", "e2el:600000",
        "--save-result", "--save-detailed", "--result-dir", str(tmp_path), "--result-filename", "run.json",
    )  # fmt: skip
    captured = capsys.readouterr()
    assert status == 0, captured.err
    result = json.loads((tmp_path / "run.json").read_text())
    assert result["completed"] == 6 and result["failed"] == 0
    # the prompts had exactly the asked tokens, as the server counts them
    assert result["input_lens"] == [24] * 6 and result["total_input_tokens"] == 144
    assert metric(server.url, "vllm:prompt_tokens_total") - prompt_before == 144
    assert result["output_lens"] == [6] * 6 and result["total_output_tokens"] == 36
    assert metric(server.url, "vllm:generation_tokens_total") - generated_before == 36
    assert all(len(itl) == 5 for itl in result["itls"])
    assert result["request_goodput"] == pytest.approx(result["request_throughput"])
    assert 1 <= result["max_concurrent_requests"] <= 2
    assert result["p50_ttft_ms"] == pytest.approx(result["median_ttft_ms"])
    assert result["p99_e2el_ms"] >= result["median_e2el_ms"] >= result["p50_ttft_ms"] > 0
    assert "Successful requests:                     6" in captured.out
    assert "Median TPOT (ms):" in captured.out and "P99 E2EL (ms):" in captured.out
    assert "6/6" in captured.err  # the progress bar


def test_the_runs_kv_pulls_are_read_from_the_decode_workers_metrics(server, tmp_path, capsys):
    (decode_metrics_port,) = [port for _, port in server.workers["decode"]]  # as `pdserve serve` prints it
    status = _bench(
        server.url, "--random-input-len", "40", "--random-output-len", "3", "--num-prompts", "4",
        "--max-concurrency", "2", "--ignore-eos", "--seed", "11", "--disable-tqdm",
        "--worker-metrics-url", f"http://127.0.0.1:{decode_metrics_port}",
        "--save-result", "--result-filename", str(tmp_path / "pulls.json"),
    )  # fmt: skip
    captured = capsys.readouterr()
    assert status == 0, captured.err
    pulls = json.loads((tmp_path / "pulls.json").read_text())["kv_pulls"]
    # every prompt went to the prefill worker (--local-prefill-threshold 0) and was pulled once
    assert pulls["num_pulls"] == 4 == pulls["num_connector_transfers"]
    assert pulls["num_failed_pulls"] == 0
    assert pulls["mean_pull_ms"] >= pulls["mean_connector_xfer_ms"] > 0
    assert pulls["mean_pull_bytes"] > 0 and pulls["pull_gb_per_s"] > 0
    assert "KV pulls:                                4" in captured.out
    # the router's endpoint is not a worker's: the run stops before it sends anything
    assert _bench(server.url, "--num-prompts", "1", "--worker-metrics-url", server.url) == 1
    assert "exports no pdserve:kv_pull_seconds" in capsys.readouterr().err


def test_chat_at_several_rates_writes_one_result_per_rate_and_the_charts(server, tmp_path, capsys):
    plots = tmp_path / "plots"
    status = _bench(
        server.url, "--backend", "openai-chat", "--random-input-len", "16", "--random-output-len", "3",
        "--num-prompts", "3", "--ignore-eos", "--request-rate", "20,inf", "--disable-tqdm",
        "--save-result", "--result-dir", str(tmp_path), "--result-filename", "chat.json", "--plot", str(plots),
    )  # fmt: skip
    captured = capsys.readouterr()
    assert status == 0, captured.err
    for rate in ("20", "inf"):
        result = json.loads((tmp_path / f"chat-{rate}qps.json").read_text())
        assert result["completed"] == 3 and result["endpoint_type"] == "openai-chat"
        assert result["total_output_tokens"] == 9
    assert captured.out.count("Serving Benchmark Result") == 2
    for name in ("ttft_cdf", "tpot_cdf", "itl_cdf", "e2el_cdf", "throughput_vs_rate"):
        assert (plots / f"{name}.png").read_bytes().startswith(PNG_MAGIC)
    assert "%|" not in captured.err  # --disable-tqdm


def test_a_trace_is_replayed_on_its_timestamps(server, tmp_path, capsys):
    trace = tmp_path / "trace.jsonl"
    lines = [
        {"timestamp": 0, "input_length": 40, "output_length": 3, "hash_ids": [1, 2, 3]},
        {"timestamp": 1000, "input_length": 36, "output_length": 2, "hash_ids": [1, 2, 4]},
        {"timestamp": 2000, "input_length": 20, "output_length": 2, "hash_ids": [5, 6]},
    ]
    trace.write_text("".join(json.dumps(line) + "\n" for line in lines))
    status = _bench(
        server.url, "--dataset-name", "trace", "--dataset-path", str(trace), "--trace-block-size", "16",
        "--trace-time-scale", "0.5", "--ignore-eos", "--save-result", "--save-detailed",
        "--result-filename", str(tmp_path / "trace.json"),
    )  # fmt: skip
    assert status == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "trace.json").read_text())
    assert result["completed"] == 3 and result["request_rate"] == "trace"
    assert result["input_lens"] == [40, 36, 20] and result["output_lens"] == [3, 2, 2]
    starts = result["start_times"]
    assert starts[1] - starts[0] >= 0.5 and starts[2] - starts[0] >= 1.0  # not sent before their time


def test_requests_the_server_refuses_are_counted_as_failed(server, capsys):
    status = _bench(
        server.url, "--random-input-len", str(MAX_MODEL_LEN + 10), "--random-output-len", "4",
        "--num-prompts", "2", "--disable-tqdm",
    )  # fmt: skip
    captured = capsys.readouterr()
    assert status == 1
    assert "Successful requests:                     0" in captured.out
    assert "Failed requests:                         2" in captured.out
    assert "HTTP 400" in captured.err and "maximum context length" in captured.err


def test_a_server_that_is_not_there_fails_every_request_without_a_traceback(smollm2_source, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    status = _bench(
        url, "--model", "m", "--tokenizer", str(smollm2_source.path), "--random-input-len", "8",
        "--random-output-len", "2", "--num-prompts", "3", "--disable-tqdm",
    )  # fmt: skip
    captured = capsys.readouterr()
    assert status == 1
    assert "Failed requests:                         3" in captured.out
    assert "ConnectError" in captured.err and "Traceback" not in captured.err
    # without --model the bench cannot start: it says how to fix that
    assert _bench(url, "--num-prompts", "1") == 1
    assert "start it (pdserve serve)" in capsys.readouterr().err
