"""`pdserve bench serve`: load an OpenAI-compatible server with streamed requests and report
TTFT, TPOT, ITL and E2EL percentiles, throughput and goodput, with the flags, table and
JSON result of `vllm bench serve`.

    pdserve bench serve --dataset-name random --random-input-len 128 --random-output-len 32 \\
        --num-prompts 32 --max-concurrency 4 --ignore-eos --save-result
    pdserve bench serve --request-rate 1,2,4 --plot plots/     # one run per rate, with charts
    pdserve bench serve --dataset-name trace --dataset-path trace.jsonl --trace-time-scale 0.5
    pdserve bench serve --worker-metrics-url http://127.0.0.1:PORT   # + the decode worker's KV pulls

Torch-free: it runs on any machine that reaches the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections import Counter
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from pdserve.bench.serve.arrivals import send_times
from pdserve.bench.serve.cli_args import CHAT_SUFFIX, Choices, resolve_backend
from pdserve.bench.serve.client import ApiTarget
from pdserve.bench.serve.datasets import (
    JSON_DATASETS,
    SampleRequest,
    check_structured_outputs,
    json_schema_requests,
    prefix_repetition_requests,
    random_requests,
    sharegpt_requests,
    trace_requests,
)
from pdserve.bench.serve.kv_pulls import KVPullFigures, WorkerMetricsScrape, kv_pull_figures
from pdserve.bench.serve.metrics import RequestResult, compute_metrics
from pdserve.bench.serve.plots import PlottedRun
from pdserve.bench.serve.progress import ProgressBar
from pdserve.bench.serve.prompt_builder import PromptBuilder
from pdserve.bench.serve.report import RunSettings, format_summary, result_json
from pdserve.bench.serve.runner import run_requests
from pdserve.bench.serve.text_tokenizer import LocalTokenizer, ServerTokenizer, TextTokenizer


def run_bench_serve(args: argparse.Namespace) -> int:
    """The command: exit status 0 when every run had a successful request, 1 otherwise."""
    try:
        return _run(args)
    except (ValueError, RuntimeError) as exc:
        print(f"bench serve: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    choices = Choices.of(args)
    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts {args.num_prompts} must be at least 1")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency {args.max_concurrency} must be at least 1")
    backend, endpoint = resolve_backend(args.backend, args.endpoint)
    base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    served = _wait_for_models(base_url, headers, args.ready_check_timeout_sec, needed=args.model is None)
    model = args.model or served[0]["id"]
    request_model = args.served_model_name or model
    max_model_len = next((m.get("max_model_len") for m in served if m.get("id") == request_model), None)
    if args.tokenizer:
        tokenizer: TextTokenizer = LocalTokenizer(args.tokenizer)
    elif served:
        tokenizer = ServerTokenizer(base_url, request_model, headers)
    else:
        raise RuntimeError(f"the server at {base_url} did not answer, and without it --tokenizer is needed")
    target = ApiTarget(
        url=base_url + endpoint,
        model=request_model,
        chat=endpoint.rstrip("/").endswith(CHAT_SUFFIX),
        api_key=args.api_key,
        ignore_eos=args.ignore_eos,
        sampling={
            k: v for k in ("temperature", "top_p", "top_k", "min_p") if (v := getattr(args, k)) is not None
        },
        extra_body=choices.extra_body,
    )
    settings = RunSettings(
        backend=backend,
        model=model,
        tokenizer=tokenizer.name,
        num_prompts=args.num_prompts,
        request_rate=choices.rates[0],
        burstiness=args.burstiness,
        max_concurrency=args.max_concurrency,
        percentile_metrics=choices.metric_names,
        label=args.label,
    )
    try:
        return _benchmark(args, choices, tokenizer, target, settings, max_model_len)
    finally:
        if isinstance(tokenizer, ServerTokenizer):
            tokenizer.close()


def _benchmark(
    args: argparse.Namespace,
    choices: Choices,
    tokenizer: TextTokenizer,
    target: ApiTarget,
    settings: RunSettings,
    max_model_len: int | None,
) -> int:
    rates = choices.rates
    scrape = WorkerMetricsScrape(choices.worker_metrics_urls) if choices.worker_metrics_urls else None
    if scrape is not None:
        scrape.snapshot()  # a wrong URL stops the benchmark before it sends anything
    started = time.monotonic()
    requests = build_requests(args, tokenizer, target.chat, max_model_len)
    print(
        f"bench serve: {len(requests)} {args.dataset_name} requests ({sum(r.prompt_len for r in requests)} prompt "
        f"tokens, built in {time.monotonic() - started:.1f} s) to {target.url}, model {target.model}",
        file=sys.stderr,
    )
    if requests[0].send_at_s is not None and len(rates) > 1:
        raise ValueError("a trace is replayed on its own timestamps: give one --request-rate, or none")
    too_long = sum(
        1 for r in requests if max_model_len and r.prompt_len + r.expected_output_len > max_model_len
    )
    if too_long:
        print(
            f"bench serve: {too_long} requests ask for more than the server's max_model_len {max_model_len} "
            "tokens (prompt + output); the server will refuse them and they count as failed",
            file=sys.stderr,
        )
    if args.num_warmups > 0:
        warmups = [requests[i % len(requests)] for i in range(args.num_warmups)]
        print(f"bench serve: {len(warmups)} warm-up requests", file=sys.stderr)
        asyncio.run(run_requests(target, warmups, [0.0] * len(warmups), args.max_concurrency))

    runs: list[PlottedRun] = []
    status = 0
    for rate in rates:
        times = send_times(requests, rate, args.burstiness, args.seed)
        before = scrape.snapshot() if scrape is not None else None
        progress = ProgressBar(len(requests), enabled=not args.disable_tqdm)
        results, duration = asyncio.run(run_requests(target, requests, times, args.max_concurrency, progress))
        progress.close()
        kv_pulls = _kv_pulls_since(scrape, before)
        check_structured_outputs(requests, results)
        metrics = compute_metrics(results, duration, choices.percentiles, choices.slos)
        replayed = requests[0].send_at_s is not None
        settings = replace(settings, num_prompts=len(requests), request_rate="trace" if replayed else rate)
        print(format_summary(metrics, settings, kv_pulls))
        _report_failures(results)
        if args.save_result:
            date = datetime.now().strftime("%Y%m%d-%H%M%S")
            document = result_json(
                metrics, settings, results, date, args.save_detailed, choices.metadata, kv_pulls
            )
            path = result_path(args, settings.backend, settings.model, rate, date, several=len(rates) > 1)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(document, indent=2) + "\n")
            print(f"bench serve: result written to {path}", file=sys.stderr)
        runs.append(PlottedRun(rate, results, metrics))
        if metrics.completed == 0:
            status = 1
    if args.plot:
        from pdserve.bench.serve.plots import write_plots

        for path in write_plots(runs, args.plot):
            print(f"bench serve: wrote {path}", file=sys.stderr)
    return status


def build_requests(
    args: argparse.Namespace, tokenizer: TextTokenizer, chat: bool, max_model_len: int | None
) -> list[SampleRequest]:
    """The dataset --dataset-name names, with prompt tokens counted as the server counts them."""
    name = args.dataset_name
    if name in ("sharegpt", "trace") and not args.dataset_path:
        raise ValueError(f"--dataset-name {name} needs --dataset-path FILE")
    add_special = not chat  # a chat's content gets no BOS of its own: the template adds the frame
    if name in JSON_DATASETS:
        return json_schema_requests(
            tokenizer, add_special, args.num_prompts, args.json_output_len, args.json_schema_path,
            unique=name == "json-unique", structured_ratio=args.structured_output_ratio, seed=args.seed,
        )  # fmt: skip
    if name == "sharegpt":
        return sharegpt_requests(
            args.dataset_path, tokenizer, add_special, args.num_prompts, args.sharegpt_output_len,
            max_model_len, args.seed,
        )  # fmt: skip
    builder = PromptBuilder(tokenizer, add_special, args.seed)
    if name == "random":
        return random_requests(
            builder, args.num_prompts, args.random_input_len, args.random_output_len, args.random_range_ratio,
            args.random_prefix_len, args.seed,
        )  # fmt: skip
    if name == "prefix_repetition":
        return prefix_repetition_requests(
            builder, args.num_prompts, args.prefix_repetition_prefix_len, args.prefix_repetition_suffix_len,
            args.prefix_repetition_num_prefixes, args.prefix_repetition_output_len, args.seed,
        )  # fmt: skip
    return trace_requests(
        args.dataset_path, builder, args.num_prompts, args.trace_block_size, args.trace_time_scale, args.seed
    )


def result_path(
    args: argparse.Namespace, backend: str, model: str, rate: float, date: str, several: bool
) -> Path:
    rate_text = "inf" if math.isinf(rate) else f"{rate:g}"
    if args.result_filename:
        name = Path(args.result_filename)
        if several:
            name = name.with_name(f"{name.stem}-{rate_text}qps{name.suffix or '.json'}")
    else:
        concurrency = f"-concurrency{args.max_concurrency}" if args.max_concurrency is not None else ""
        name = Path(f"{args.label or backend}-{rate_text}qps{concurrency}-{model.split('/')[-1]}-{date}.json")
    return Path(args.result_dir or ".") / name


def _wait_for_models(
    base_url: str, headers: dict[str, str], timeout_s: float, needed: bool
) -> list[dict[str, Any]]:
    """The server's /v1/models list, waiting up to timeout_s for it to answer; [] if it never
    does and the model was named (the run then records every request as failed)."""
    deadline = time.monotonic() + timeout_s
    problem = ""
    while True:
        try:
            response = httpx.get(base_url + "/v1/models", headers=headers, timeout=10.0, trust_env=False)
            if response.status_code == 200:
                models = response.json().get("data") or []
                if models:
                    return models
                problem = "its /v1/models lists no model"
            elif response.status_code in (401, 403):
                raise RuntimeError(f"{base_url}/v1/models answered {response.status_code}: pass --api-key")
            else:
                problem = f"/v1/models answered {response.status_code}"
        except httpx.HTTPError as exc:
            problem = f"{type(exc).__name__}: {exc}"
        if time.monotonic() >= deadline:
            break
        time.sleep(1.0)
    message = f"the server at {base_url} is not ready ({problem})"
    if needed:
        raise RuntimeError(
            f"{message}; start it (pdserve serve), check --base-url, or raise --ready-check-timeout-sec"
        )
    print(f"bench serve: {message}; going on with --model as given", file=sys.stderr)
    return []


def _kv_pulls_since(
    scrape: WorkerMetricsScrape | None, before: dict[str, float] | None
) -> KVPullFigures | None:
    """The run's KV pulls; None without --worker-metrics-url, or (with a warning, the run's
    own figures still reported) when a worker can no longer be read."""
    if scrape is None or before is None:
        return None
    try:
        return kv_pull_figures(before, scrape.snapshot())
    except RuntimeError as exc:
        print(f"bench serve: no KV pull figures for this run: {exc}", file=sys.stderr)
        return None


def _report_failures(results: list[RequestResult]) -> None:
    errors = Counter(r.error for r in results if not r.success)
    if errors:
        error, count = errors.most_common(1)[0]
        print(
            f"bench serve: {sum(errors.values())} requests failed; the most common error ({count}x): {error}",
            file=sys.stderr,
        )
