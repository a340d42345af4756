"""TTFT and TPOT through `pdserve serve` with every prompt prefilled remotely (prefill
worker → KV transfer → decode worker) against the same stack prefilling on the decode
worker (the aggregated path), on the same requests, one at a time.

    pdserve bench disagg-latency [--num-requests 8] [--prompt-words 300] [--max-tokens 32]

A first look until `pdserve bench serve` exists; prints a small table.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"pdserve serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError("pdserve serve did not become healthy")


def _stream_one(url: str, model: str, prompt: str, max_tokens: int) -> tuple[float, float]:
    body = json.dumps(
        {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
    ).encode()
    request = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
    start = time.perf_counter()
    first = last = None
    chunks = 0
    with urllib.request.urlopen(request, timeout=300) as resp:
        for line in resp:
            if line.startswith(b"data: {"):
                now = time.perf_counter()
                first = first if first is not None else now
                last = now
                chunks += 1
    ttft = first - start
    tpot = (last - first) / max(max_tokens - 1, 1)
    return ttft, tpot


def _measure(threshold: int, args: argparse.Namespace, prompts: list[str]) -> tuple[list[float], list[float]]:
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pdserve.cli.main",
            "serve",
            "--port",
            str(port),
            "--local-prefill-threshold",
            str(threshold),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc)
        _stream_one(url, args.model, "warm up", 4)
        results = [_stream_one(url, args.model, p, args.max_tokens) for p in prompts]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    return [r[0] for r in results], [r[1] for r in results]


def add_disagg_latency_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-requests", type=int, default=8, help="Requests per mode, sent one at a time.")
    parser.add_argument("--prompt-words", type=int, default=300, help="Words in each (distinct) prompt.")
    parser.add_argument("--max-tokens", type=int, default=32, help="Output tokens per request (ignore_eos).")
    parser.add_argument("--model", default="SmolLM2-135M-Instruct", help="Served model name.")


def run_disagg_latency(args: argparse.Namespace) -> int:
    """Measure both paths on the same prompts and print the table."""
    words = "river stone light garden number window market paper cloud music".split()
    prompts = [
        f"Request {i}: " + " ".join(words[(i + j) % len(words)] for j in range(args.prompt_words))
        for i in range(args.num_requests)
    ]
    rows = []
    for name, threshold in (("disaggregated (remote prefill)", 0), ("aggregated (prefill on decode)", 10**9)):
        ttft, tpot = _measure(threshold, args, prompts)
        rows.append((name, ttft, tpot))
    print("| path | TTFT p50 ms | TTFT max ms | TPOT p50 ms | TPOT max ms |\n|---|---:|---:|---:|---:|")
    for name, ttft, tpot in rows:
        print(
            f"| {name} | {statistics.median(ttft) * 1e3:.0f} | {max(ttft) * 1e3:.0f} | "
            f"{statistics.median(tpot) * 1e3:.1f} | {max(tpot) * 1e3:.1f} |"
        )
    return 0
