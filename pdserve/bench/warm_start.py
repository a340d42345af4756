"""`pdserve bench warm-start`: how long `pdserve serve` takes to be ready, and its first
request's TTFT against the requests after it, with an empty kernel cache (cold) and then
with the cache the cold start filled (warm).

    pdserve bench warm-start [--num-requests 8] [--prompt-len 512] [--json FILE] \\
        -- --model DIR --load-format dummy --dtype bfloat16 --max-model-len 4096 ...

Every run starts `pdserve serve` with the flags after `--` and TRITON_CACHE_DIR set to a
folder of its own: empty for `cold` (and `no-warmup`, which adds --no-warmup: the cold start
without the warm-up, as a baseline), as the run before left it for `warm`. It times the
spawn until the router's /health answers 200 (it does once every worker it was given is
ready), then streams 1 + N completions through the router one at a time, each of
--prompt-len token ids of its own (no request finds another's prompt in the prefix cache),
and records each one's TTFT. From the workers' output it reads how long each one's warm-up
took and how many kernels still compiled while serving (common/engine/warmup.py logs both).
On CPU nothing compiles: the runs differ by the start-up alone.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pdserve.bench.table import format_table

RUNS = ("cold", "warm", "no-warmup")
# Prompt token ids are drawn from here: inside every real vocabulary, clear of the special
# tokens that sit at the start of most.
TOKEN_IDS = range(1000, 9000)
_POLL_S = 0.05
_WARMUP_LINE = re.compile(r"warm-up: (\d+) steps .* in ([\d.]+) s(?:; (\d+) Triton kernel variants)?")
_COMPILED_WHILE_SERVING = "ran for the first time while serving"


@dataclass
class RunResult:
    name: str
    time_to_ready_s: float
    ttfts_s: list[float]  # the first request's, then each of the next --num-requests
    warmup_s: list[float] = field(default_factory=list)  # each worker's warm-up (none without one)
    warmup_kernel_variants: list[int] = field(default_factory=list)
    kernels_compiled_while_serving: int = 0

    @property
    def first_ttft_s(self) -> float:
        return self.ttfts_s[0]

    @property
    def median_ttft_s(self) -> float:
        """Median TTFT of the requests after the first."""
        return statistics.median(self.ttfts_s[1:])

    @property
    def first_over_median(self) -> float:
        return self.first_ttft_s / self.median_ttft_s

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "first_ttft_s": self.first_ttft_s,
            "median_ttft_s": self.median_ttft_s,
            "first_over_median": self.first_over_median,
        }


def add_warm_start_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-requests", type=int, default=8,
                        help="Requests after the first, whose median TTFT is the steady state.")  # fmt: skip
    parser.add_argument("--prompt-len", type=int, default=512, help="Prompt tokens of every request.")
    parser.add_argument("--max-tokens", type=int, default=4, help="Output tokens of every request.")
    parser.add_argument(
        "--runs",
        default="cold,warm",
        help=f"Starts to measure, in order, from {', '.join(RUNS)}: cold starts with an empty "
        "kernel cache, warm with the folder the run before it left, no-warmup with an empty one "
        "and --no-warmup.",
    )
    parser.add_argument("--startup-timeout", type=float, default=900.0,
                        help="Seconds a start may take before the run fails.")  # fmt: skip
    parser.add_argument("--log-dir", type=Path, default=None,
                        help="Keep each run's `pdserve serve` output here (default: a temporary folder).")  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="Also write the results to this JSON file.")
    parser.add_argument(
        "serve_args",
        nargs=argparse.REMAINDER,
        metavar="-- SERVE_FLAGS",
        help="After --: the flags of `pdserve serve` (model, engine, workers); --port is chosen here "
        "unless given.",
    )


def parse_runs(text: str) -> list[str]:
    runs = [r.strip() for r in text.split(",") if r.strip()]
    unknown = [r for r in runs if r not in RUNS]
    if unknown or not runs:
        raise ValueError(f"--runs {text!r}: each run is one of {', '.join(RUNS)}")
    if runs[0] == "warm":
        raise ValueError("--runs: a warm run needs a run before it to fill the kernel cache; start with cold")
    return runs


def serve_flags(serve_args: list[str]) -> list[str]:
    return serve_args[1:] if serve_args[:1] == ["--"] else list(serve_args)


def run_warm_start(args: argparse.Namespace) -> int:
    """Measure each run, print the table, write --json."""
    try:
        runs = parse_runs(args.runs)
    except ValueError as exc:
        print(f"pdserve bench warm-start: {exc}", file=sys.stderr)
        return 2
    flags = serve_flags(args.serve_args)
    with tempfile.TemporaryDirectory(prefix="pdserve-warm-start-") as tmp:
        log_dir = args.log_dir or Path(tmp) / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        results, cache = [], None
        for i, name in enumerate(runs):
            if name != "warm":
                cache = Path(tmp) / f"kernel-cache-{i}"
                cache.mkdir()
            assert cache is not None
            extra = ["--no-warmup"] if name == "no-warmup" else []
            try:
                result = measure_run(name, [*flags, *extra], cache, log_dir / f"serve-{i}-{name}.log", args)
            except RuntimeError as exc:
                print(f"pdserve bench warm-start: {name} run: {exc}", file=sys.stderr)
                return 1
            results.append(result)
            print(f"{name}: ready in {result.time_to_ready_s:.1f} s, first TTFT "
                  f"{result.first_ttft_s * 1e3:.0f} ms", flush=True)  # fmt: skip
    print(results_table(results))
    if args.json is not None:
        report = {
            "device": device_name(flags),
            "serve_args": flags,
            "prompt_len": args.prompt_len,
            "max_tokens": args.max_tokens,
            "num_requests": args.num_requests,
            "runs": [r.to_dict() for r in results],
        }
        args.json.write_text(json.dumps(report, indent=1), encoding="utf-8")
    return 0


def measure_run(name: str, flags: list[str], cache: Path, log: Path, args: argparse.Namespace) -> RunResult:
    """Start `pdserve serve` with `flags` and TRITON_CACHE_DIR=`cache`, time it to ready,
    stream the requests, stop it; RuntimeError (with the output's end) when it fails."""
    target = _Target.of(flags)
    argv = [sys.executable, "-m", "pdserve.cli.main", "serve", *flags]
    if not target.port_given:
        argv += ["--port", str(target.port)]
    env = {**os.environ, "TRITON_CACHE_DIR": str(cache)}
    with log.open("wb") as out:
        start = time.perf_counter()
        process = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            _wait_ready(target, process, start + args.startup_timeout, log)
            ready = time.perf_counter() - start
            model = _served_model(target)
            ttfts = [
                stream_ttft(target, model, prompt_ids(i, args.prompt_len), args.max_tokens)
                for i in range(1 + args.num_requests)
            ]
        finally:
            _stop(process)
    warmup_s, variants, compiled = read_worker_output(log.read_text(encoding="utf-8", errors="replace"))
    return RunResult(name, ready, ttfts, warmup_s, variants, compiled)


def prompt_ids(index: int, length: int) -> list[int]:
    """Request `index`'s prompt: its own `length` token ids."""
    rng = random.Random(index)
    return [rng.choice(TOKEN_IDS) for _ in range(length)]


def read_worker_output(text: str) -> tuple[list[float], list[int], int]:
    """(each worker's warm-up seconds, the Triton kernel variants each warm-up ran, the kernels
    first run while serving) from `pdserve serve`'s output."""
    seconds, variants = [], []
    for match in _WARMUP_LINE.finditer(text):
        seconds.append(float(match.group(2)))
        if match.group(3) is not None:
            variants.append(int(match.group(3)))
    return seconds, variants, text.count(_COMPILED_WHILE_SERVING)


def results_table(results: list[RunResult]) -> str:
    header = ["run", "ready s", "warm-up s", "first TTFT ms", "median TTFT ms (next N)", "first / median",
              "compiled while serving"]  # fmt: skip
    rows = [
        [
            r.name,
            f"{r.time_to_ready_s:.1f}",
            "/".join(f"{s:.1f}" for s in r.warmup_s) or "-",
            f"{r.first_ttft_s * 1e3:.0f}",
            f"{r.median_ttft_s * 1e3:.0f}",
            f"{r.first_over_median:.2f}",
            # only a worker that warmed up watches for first runs: without one, nothing counts them
            str(r.kernels_compiled_while_serving) if r.warmup_s else "not counted",
        ]
        for r in results
    ]
    return format_table(header, rows, "lrrrrrr")


def device_name(flags: list[str]) -> str:
    """ "cpu" under --device cpu or without a GPU, else the GPU's name as nvidia-smi gives it
    (no CUDA context in this process: it would take memory from the server's)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--device", default="auto")
    if parser.parse_known_args(flags)[0].device == "cpu" or shutil.which("nvidia-smi") is None:
        return "cpu"
    result = subprocess.run(
        ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    names = result.stdout.strip().splitlines()
    return names[0] if result.returncode == 0 and names else "cpu"


@dataclass(frozen=True)
class _Target:
    """Where the server will listen, and how to call it."""

    host: str
    port: int
    port_given: bool
    api_key: str | None

    @classmethod
    def of(cls, flags: list[str]) -> _Target:
        parser = argparse.ArgumentParser(add_help=False)
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=None)
        parser.add_argument("--api-key", nargs="+", default=None)
        known, _ = parser.parse_known_args(flags)
        host = "127.0.0.1" if known.host in ("", "0.0.0.0", "::") else known.host
        port = known.port if known.port else _free_port()
        return cls(host, port, bool(known.port), known.api_key[0] if known.api_key else None)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def request(self, path: str, body: dict[str, Any] | None = None) -> urllib.request.Request:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        return urllib.request.Request(self.url + path, data, headers)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(target: _Target, process: subprocess.Popen, deadline: float, log: Path) -> None:
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"pdserve serve exited with status {process.returncode}:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(target.request("/health"), timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass  # not listening yet, or 503 until every worker is in
        if time.perf_counter() > deadline:
            raise RuntimeError(f"pdserve serve was not ready within --startup-timeout:\n{_tail(log)}")
        time.sleep(_POLL_S)


def _served_model(target: _Target) -> str:
    with urllib.request.urlopen(target.request("/v1/models"), timeout=30) as response:
        return json.load(response)["data"][0]["id"]


def stream_ttft(target: _Target, model: str, prompt: list[int], max_tokens: int) -> float:
    """Seconds from sending a streamed completion to its first token."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}  # fmt: skip
    start = time.perf_counter()
    first = None
    try:
        with urllib.request.urlopen(target.request("/v1/completions", body), timeout=600) as response:
            for line in response:
                if first is None and line.startswith(b"data: {"):
                    if b'"error"' in line:
                        raise RuntimeError(f"the server answered with an error: {line.decode().strip()}")
                    first = time.perf_counter()
    except urllib.error.HTTPError as exc:
        raise RuntimeError(
            f"the completion failed with HTTP {exc.code}: {exc.read().decode(errors='replace')}"
        ) from None
    if first is None:
        raise RuntimeError("the completion streamed no token")
    return first - start


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
