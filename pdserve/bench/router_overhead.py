"""What the router adds to a request: routing decisions per second, and the latency it
adds per request on prompts of about 4k tokens, through the real HTTP path.

`pdserve router` runs as operators run it (its own process, uvicorn, the embedded
model's tokenizer) in front of stand-in decode workers that speak the real worker
protocol and answer every request at once with one token (no model), so what is timed
is the router's own work: HTTP and JSON, tokenizing a text prompt, block hashing, the
routing decision, the ZMQ round trip, detokenizing, the response. The baseline is the
same GenerateRequest sent straight to a stand-in worker over ZMQ: the difference is
what the router adds (of the p50s and of the p99s; the two samples are independent).
Decisions are timed in this process on the router's own code: the prompt's block hashes
(request_block_hashes, block size 16, sha256) and RoutingPolicy.choose with its default
weights over N workers, with the prefix index holding every earlier prompt on some
worker (the prompts share a system prompt, so each decision matches a real prefix).

    pdserve bench router-overhead [--num-requests 200] [--prompt-tokens 4096] [--num-workers 8]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import httpx
import zmq

from common.config.arg_types import int_at_least
from common.kv_events import BlockStored, KVEventBatch
from common.protocol import (
    GenerateRequest,
    Hello,
    LoadReport,
    TokenDelta,
    WorkerRole,
    decode_message,
    encode_message,
    sampling_params_to_wire,
)
from common.sampling_params import SamplingParams
from pdserve.bench.stats import percentile
from pdserve.bench.table import format_table
from router.policy import PolicyWeights, RoutingPolicy
from router.prefix_index import PrefixIndex, request_block_hashes
from router.worker_state import WorkerState

BLOCK_SIZE = 16  # vLLM's default, what the stand-in workers report
HASH_ALGO = "sha256"
REPLY_TOKEN = 1000  # the one token every stand-in answer carries (a word in the tokenizer)
_WORDS = (
    "the cluster routes each request to the worker whose cache already holds the longest "
    "prefix of its prompt while keeping the queues short so that time to first token stays "
    "low for every user of the service under load and during bursts of traffic"
).split()


# -- the stand-in workers (a child process) ---------------------------------------------------


def serve_instant_workers(addresses: Sequence[str]) -> None:
    """Decode workers on one thread: a load report on hello and every 0.5 s, and for each
    request one token that ends it. Runs until the process is stopped."""
    ctx = zmq.Context()
    poller = zmq.Poller()
    sockets = []
    for address in addresses:
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(address)
        poller.register(sock, zmq.POLLIN)
        sockets.append(sock)
    routers: dict[zmq.Socket, set[bytes]] = {sock: set() for sock in sockets}
    reports = {
        sock: encode_message(
            LoadReport(worker_id=f"instant-{i}", role=WorkerRole.DECODE, engine_id=f"instant-{i}",
                       num_kv_blocks=100_000, max_num_seqs=256, block_size=BLOCK_SIZE,
                       prefix_caching_hash_algo=HASH_ALGO)
        )
        for i, sock in enumerate(sockets)
    }  # fmt: skip
    next_report = 0.0
    while True:
        for sock, _ in poller.poll(100):
            frames = sock.recv_multipart()
            message = decode_message(frames[-1])
            if isinstance(message, Hello):
                routers[sock].add(frames[0])
                sock.send_multipart([frames[0], reports[sock]])
            elif isinstance(message, GenerateRequest):
                answer = TokenDelta(message.request_id, [REPLY_TOKEN], finish_reason="length",
                                    num_prompt_tokens=len(message.prompt_token_ids))  # fmt: skip
                sock.send_multipart([frames[0], encode_message(answer)])
        if time.monotonic() >= next_report:
            next_report = time.monotonic() + 0.5
            for sock, identities in routers.items():
                for identity in identities:
                    sock.send_multipart([identity, reports[sock]])


# -- prompts -----------------------------------------------------------------------------------


def make_prompts(tokenizer: Any, count: int, num_tokens: int, seed: int = 0) -> list[list[int]]:
    """`count` prompts of `num_tokens` token ids: a system prompt of a quarter of them that
    all share, then words of their own."""
    rng = random.Random(seed)

    def words(n: int) -> str:
        return " ".join(rng.choice(_WORDS) for _ in range(n))

    system = tokenizer.encode(words(num_tokens // 4), add_special_tokens=False)[: num_tokens // 4]
    prompts = []
    for i in range(count):
        own = tokenizer.encode(f" request {i}: " + words(num_tokens), add_special_tokens=False)
        prompts.append((system + own)[:num_tokens])
    return prompts


# -- the decision, in this process ---------------------------------------------------------------


def time_decisions(prompts: Sequence[Sequence[int]], num_workers: int) -> tuple[list[float], list[float]]:
    """Seconds of block hashing and of RoutingPolicy.choose per prompt; each prompt is
    then indexed as cached on the worker it went to, as its KV events would say."""
    index = PrefixIndex()
    policy = RoutingPolicy(index, BLOCK_SIZE, PolicyWeights())
    workers = [WorkerState(f"w{i}", WorkerRole.DECODE, f"sim://{i}") for i in range(num_workers)]
    hash_s, choose_s = [], []
    for n, ids in enumerate(prompts):
        t0 = time.perf_counter()
        hashes = request_block_hashes(ids, BLOCK_SIZE, HASH_ALGO)
        t1 = time.perf_counter()
        worker, _ = policy.choose(workers, hashes, len(ids))
        t2 = time.perf_counter()
        hash_s.append(t1 - t0)
        choose_s.append(t2 - t1)
        stored = BlockStored(block_hashes=hashes, parent_block_hash=None, token_ids=[], block_size=BLOCK_SIZE)
        index.apply_batch(worker.worker_id, KVEventBatch(ts=0.0, events=[stored]))
        worker.note_request_sent(str(n), len(ids), len(hashes))
        if n >= 16:  # about 16 requests run on the workers at a time
            workers[(n - 16) % num_workers].note_request_finished(str(n - 16))
    return hash_s, choose_s


# -- through HTTP and straight to a worker ---------------------------------------------------------


def time_http(url: str, bodies: Sequence[bytes]) -> tuple[list[float], list[int]]:
    """Seconds per request, one at a time on one keep-alive connection; and the prompt
    tokens the router counted for each."""
    seconds, prompt_tokens = [], []
    with httpx.Client(base_url=url, timeout=60, headers={"content-type": "application/json"}) as client:
        for body in bodies:
            t0 = time.perf_counter()
            response = client.post("/v1/completions", content=body)
            seconds.append(time.perf_counter() - t0)
            if response.status_code != 200:
                raise RuntimeError(f"the router answered {response.status_code}: {response.text[:300]}")
            prompt_tokens.append(response.json()["usage"]["prompt_tokens"])
    return seconds, prompt_tokens


def time_direct(address: str, prompts: Sequence[list[int]]) -> list[float]:
    """Seconds per GenerateRequest sent straight to a worker and answered, one at a time."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.connect(address)
    wire = sampling_params_to_wire(SamplingParams(max_tokens=1, temperature=0.0))
    seconds = []
    try:
        for n, ids in enumerate(prompts):
            t0 = time.perf_counter()
            sock.send(encode_message(GenerateRequest(f"direct-{n}", ids, wire)))
            answer = decode_message(sock.recv())
            seconds.append(time.perf_counter() - t0)
            assert isinstance(answer, TokenDelta) and answer.finish_reason == "length", answer
    finally:
        sock.close(0)
        ctx.term()
    return seconds


def requests_per_s(url: str, bodies: Sequence[bytes], concurrency: int) -> float:
    """Requests per second the router completes with `concurrency` clients sending at once."""
    pending = list(bodies)
    lock = threading.Lock()
    failures: list[str] = []

    def client_loop() -> None:
        with httpx.Client(base_url=url, timeout=60, headers={"content-type": "application/json"}) as client:
            while True:
                with lock:
                    if not pending:
                        return
                    body = pending.pop()
                response = client.post("/v1/completions", content=body)
                if response.status_code != 200:
                    failures.append(f"{response.status_code}: {response.text[:200]}")

    threads = [threading.Thread(target=client_loop) for _ in range(concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed, the first: {failures[0]}")
    return len(bodies) / elapsed


# -- the command -------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_router(addresses: Sequence[str], port: int) -> subprocess.Popen:
    argv = [sys.executable, "-m", "pdserve", "router", "--decode-workers", ",".join(addresses),
            "--port", str(port), "--uvicorn-log-level", "warning", "--disable-uvicorn-access-log"]  # fmt: skip
    router = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if router.poll() is not None:
            raise RuntimeError(
                f"pdserve router exited with {router.returncode}: {router.stderr.read()[-2000:]}"
            )  # type: ignore[union-attr]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return router
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    router.kill()
    raise RuntimeError("pdserve router did not become healthy within 120 s")


def _ms(values: Sequence[float]) -> tuple[float, float, float]:
    ordered = sorted(values)
    return percentile(ordered, 50) * 1e3, percentile(ordered, 99) * 1e3, sum(values) / len(values) * 1e3


def run_benchmark(num_requests: int, prompt_tokens: int, num_workers: int, concurrency: int,
                  warmup: int = 5) -> dict[str, Any]:  # fmt: skip
    """Every figure of the report, in milliseconds and per second."""
    from common.model_files import embedded_default_model
    from common.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(embedded_default_model())
    prompts = make_prompts(tokenizer, warmup + num_requests, prompt_tokens)
    hash_s, choose_s = time_decisions(prompts, num_workers)
    decision_s = [h + c for h, c in zip(hash_s, choose_s, strict=True)]

    def body(prompt: Any) -> bytes:
        return json.dumps({"prompt": prompt, "max_tokens": 1, "temperature": 0.0}).encode()

    text_bodies = [body(tokenizer.decode(ids)) for ids in prompts]
    id_bodies = [body(ids) for ids in prompts]
    addresses = [f"tcp://127.0.0.1:{_free_port()}" for _ in range(num_workers)]
    workers = multiprocessing.get_context("spawn").Process(target=serve_instant_workers, args=(addresses,),
                                                           daemon=True)  # fmt: skip
    workers.start()
    router = None
    try:
        port = _free_port()
        router = _start_router(addresses, port)
        url = f"http://127.0.0.1:{port}"
        time_http(url, text_bodies[:warmup] + id_bodies[:warmup])
        text_s, text_tokens = time_http(url, text_bodies[warmup:])
        ids_s, _ = time_http(url, id_bodies[warmup:])
        direct_s = time_direct(addresses[0], prompts)[warmup:]
        throughput = requests_per_s(url, text_bodies[warmup:], concurrency)
    finally:
        if router is not None:
            router.terminate()
            router.wait(10)
        workers.terminate()
        workers.join(10)
    rows = {
        "block hashes": _ms(hash_s[warmup:]),
        "RoutingPolicy.choose": _ms(choose_s[warmup:]),
        "decision (hashes + choose)": _ms(decision_s[warmup:]),
        "router, prompt as text": _ms(text_s),
        "router, prompt as token ids": _ms(ids_s),
        "straight to the worker (ZMQ)": _ms(direct_s),
    }
    direct = rows["straight to the worker (ZMQ)"]
    for form in ("text", "token ids"):
        routed = rows[f"router, prompt as {form}"]
        rows[f"added by the router, {form}"] = tuple(r - d for r, d in zip(routed, direct, strict=True))
    return {
        "num_requests": num_requests,
        "prompt_tokens_mean": sum(text_tokens) / len(text_tokens),
        "num_workers": num_workers,
        "rows_ms": {name: {"p50": v[0], "p99": v[1], "mean": v[2]} for name, v in rows.items()},
        "decisions_per_s": 1.0 / (sum(decision_s[warmup:]) / num_requests),
        "concurrency": concurrency,
        "requests_per_s": throughput,
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
    }


def format_report(result: dict[str, Any]) -> str:
    rows = [
        [name, f"{v['p50']:.2f}", f"{v['p99']:.2f}", f"{v['mean']:.2f}"]
        for name, v in result["rows_ms"].items()
    ]
    table = format_table(["per request", "p50 ms", "p99 ms", "mean ms"], rows, "lrrr")
    return (
        f"{result['num_requests']} requests of {result['prompt_tokens_mean']:.0f} prompt tokens (mean, as the "
        f"router counted them), {result['num_workers']} stand-in decode workers, one token each\n\n{table}\n\n"
        f"decisions per second (one core, hashes + choose): {result['decisions_per_s']:.0f}\n"
        f"requests per second through the router at concurrency {result['concurrency']} "
        f"(text prompts): {result['requests_per_s']:.1f}\n"
        f"machine: {result['cpus']} CPUs, load average {' '.join(f'{x:.2f}' for x in result['load_average'])}"
    )


def add_router_overhead_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--num-requests", type=int_at_least(1), default=200, help="Requests timed per measurement."
    )
    parser.add_argument("--prompt-tokens", type=int_at_least(16), default=4096, help="Tokens in each prompt.")
    parser.add_argument(
        "--num-workers", type=int_at_least(1), default=8, help="Stand-in decode workers behind the router."
    )
    parser.add_argument(
        "--concurrency", type=int_at_least(1), default=8, help="Clients at once for the requests/s figure."
    )
    parser.add_argument("--output-json", default=None, help="Also write the figures to this file as JSON.")


def run_router_overhead(args: argparse.Namespace) -> int:
    """Measure and print the table (Markdown); with --output-json, the figures too."""
    result = run_benchmark(args.num_requests, args.prompt_tokens, args.num_workers, args.concurrency)
    print(format_report(result))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
