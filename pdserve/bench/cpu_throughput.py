"""CPU throughput: `pdserve run-batch` against transformers' `generate`, same model, same requests.

    pdserve bench cpu-throughput [--num-requests 64] [--input-len 128] [--output-len 128]

Every request is a /v1/completions body with a prompt of `--input-len` random token
ids and `max_tokens` `--output-len`, greedy, ignore_eos, so both sides generate
exactly the same number of tokens. pdserve runs them all as one batch through the
run-batch path (engine in this process, model loaded once, loading not timed);
transformers runs them one at a time with `generate` (fp32, eos disabled). The
result is output tokens per second of wall time for each, printed as a Markdown
table row for docs/benchmarks.md, with the machine and date.

Needs the test extra (transformers, accelerate): pip install -e '.[test]'.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import sys
import time


def add_cpu_throughput_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-requests", type=int, default=64, help="Requests in the batch.")
    parser.add_argument("--input-len", type=int, default=128, help="Prompt tokens per request (random ids).")
    parser.add_argument(
        "--output-len", type=int, default=128, help="Tokens generated per request (ignore_eos, greedy)."
    )
    parser.add_argument(
        "--hf-num-requests",
        type=int,
        default=None,
        help="Run only the first N requests through transformers (it runs them one at a time, so its "
        "tokens/s does not depend on N); default: all of them.",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random prompts.")
    parser.add_argument("--skip-hf", action="store_true", help="Measure pdserve only.")
    parser.add_argument(
        "--skip-pdserve",
        action="store_true",
        help="Measure transformers only (on a shared machine, run each side when it is quiet).",
    )


def run_cpu_throughput(args: argparse.Namespace) -> int:
    """Measure both sides, print the JSON report and the table rows; 0 when both ran."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from common.model_files import embedded_default_model

    source = embedded_default_model()
    rng = random.Random(args.seed)
    vocab = 49152
    prompts = [[rng.randrange(vocab) for _ in range(args.input_len)] for _ in range(args.num_requests)]

    load_before = os.getloadavg()
    ours = None if args.skip_pdserve else _bench_pdserve(source, prompts, args.output_len)
    theirs = (
        None
        if args.skip_hf
        else _bench_transformers(source, prompts[: args.hf_num_requests], args.output_len)
    )

    report = {
        "date": datetime.date.today().isoformat(),
        "machine": _machine(torch),
        "load_average_before": load_before,
        "requests": args.num_requests,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "pdserve": ours,
        "transformers": theirs,
    }
    print(json.dumps(report, indent=2))
    if ours is not None:
        row = f"| {report['date']} | {report['machine']} | pdserve run-batch, {args.num_requests} requests batched | "
        row += (
            f"{ours['output_tokens_per_s']:.1f} | {ours['total_tokens_per_s']:.1f} | {ours['seconds']:.1f} |"
        )
        print(row)
    if theirs is not None:
        row = f"| {report['date']} | {report['machine']} | transformers generate, {theirs['requests']} requests one at a time | "
        row += f"{theirs['output_tokens_per_s']:.1f} | {theirs['total_tokens_per_s']:.1f} | {theirs['seconds']:.1f} |"
        print(row)
        if ours is not None:
            print(
                f"speed-up (output tokens/s): {ours['output_tokens_per_s'] / theirs['output_tokens_per_s']:.1f}x"
            )
        print(f"transformers' median request: {theirs['median_output_tokens_per_s']:.1f} output tokens/s")
    print(f"machine load average at the end: {os.getloadavg()}")
    return 0


def _bench_pdserve(source, prompts: list[list[int]], output_len: int) -> dict:
    from common.config.engine_config import EngineConfig
    from common.engine.llm_engine import LLMEngine
    from common.tokenizer import load_tokenizer
    from pdserve.cli.run_batch import run_batch, served_model_of

    started = time.perf_counter()
    engine = LLMEngine.from_config(EngineConfig())
    served = served_model_of(engine, load_tokenizer(source), source.name)
    load_seconds = time.perf_counter() - started
    lines = [
        json.dumps(
            {
                "custom_id": f"request-{i}",
                "method": "POST",
                "url": "/v1/completions",
                "body": {"prompt": prompt, "max_tokens": output_len, "temperature": 0, "ignore_eos": True},
            }
        )
        for i, prompt in enumerate(prompts)
    ]
    started = time.perf_counter()
    results, complete = run_batch(engine, served, lines, progress=True)
    seconds = time.perf_counter() - started
    if not complete or any(r["response"] is None or r["response"]["status_code"] != 200 for r in results):
        raise SystemExit(f"pdserve run-batch failed: {results[0]}")
    output_tokens = sum(r["response"]["body"]["usage"]["completion_tokens"] for r in results)
    prompt_tokens = sum(r["response"]["body"]["usage"]["prompt_tokens"] for r in results)
    return {
        "requests": len(prompts),
        "seconds": seconds,
        "load_seconds": load_seconds,
        "output_tokens": output_tokens,
        "output_tokens_per_s": output_tokens / seconds,
        "total_tokens_per_s": (output_tokens + prompt_tokens) / seconds,
        "max_num_batched_tokens": engine.config.max_num_batched_tokens,
    }


def _bench_transformers(source, prompts: list[list[int]], output_len: int) -> dict:
    import torch

    try:
        import transformers
    except ImportError:
        raise SystemExit(
            "transformers is not installed: pip install -e '.[test]' (or run with --skip-hf)"
        ) from None
    from tqdm import tqdm

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(source.path.parent), gguf_file=source.path.name, dtype=torch.float32
    ).eval()
    output_tokens = 0
    per_request: list[float] = []
    started = time.perf_counter()
    with torch.no_grad():
        for prompt in tqdm(prompts, desc="transformers", unit="req", file=sys.stderr):
            inputs = torch.tensor([prompt])
            request_started = time.perf_counter()
            out = model.generate(
                inputs,
                attention_mask=torch.ones_like(inputs),
                max_new_tokens=output_len,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
            per_request.append(time.perf_counter() - request_started)
            output_tokens += out.shape[1] - inputs.shape[1]
    seconds = time.perf_counter() - started
    prompt_tokens = sum(len(p) for p in prompts)
    median = statistics.median(per_request)
    return {
        "requests": len(prompts),
        "seconds": seconds,
        "output_tokens": output_tokens,
        "output_tokens_per_s": output_tokens / seconds,
        "total_tokens_per_s": (output_tokens + prompt_tokens) / seconds,
        # one request at a time: the median request shows the rate without other load's bursts
        "median_request_seconds": median,
        "median_output_tokens_per_s": output_len / median,
    }


def _machine(torch) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads"
