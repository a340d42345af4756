"""The flags of `pdserve bench serve` (vLLM's names and defaults) and their parsing:
every flag that needs it is checked before the server is reached. Torch-free.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from typing import Any

from pdserve.bench.serve.client import BACKENDS
from pdserve.bench.serve.datasets import DATASET_NAMES
from pdserve.bench.serve.kv_pulls import metrics_url
from pdserve.bench.serve.metrics import LATENCY_METRICS, parse_goodput

CHAT_SUFFIX = "chat/completions"


def add_bench_serve_args(parser: argparse.ArgumentParser) -> None:
    server = parser.add_argument_group("server")
    server.add_argument(
        "--backend",
        choices=sorted(BACKENDS),
        default=None,
        help="API to load: openai (or vllm) posts to /v1/completions, openai-chat to "
        "/v1/chat/completions. (default: from --endpoint, else openai)",
    )
    server.add_argument(
        "--endpoint",
        default=None,
        help="Path of the API endpoint. (default: /v1/completions, or /v1/chat/completions "
        "for --backend openai-chat)",
    )
    server.add_argument(
        "--base-url",
        default=None,
        help="Server URL, e.g. http://127.0.0.1:8000 (default: from --host and --port)",
    )
    server.add_argument("--host", default="127.0.0.1", help="Server host, when --base-url is not given.")
    server.add_argument("--port", type=int, default=8000, help="Server port, when --base-url is not given.")
    server.add_argument(
        "--api-key",
        default=os.environ.get("OPENAI_API_KEY"),
        help="Sent as 'Authorization: Bearer KEY'. (default: $OPENAI_API_KEY)",
    )
    server.add_argument(
        "--model",
        default=None,
        help="Model name to request. (default: the first model the server's /v1/models lists)",
    )
    server.add_argument(
        "--served-model-name", default=None, help="Model name sent in requests when it differs from --model."
    )
    server.add_argument(
        "--tokenizer",
        default=None,
        help="Tokenizer to count prompt tokens with: a folder with tokenizer.json, a .gguf file "
        "or a Hub id. (default: the server's own, through its /tokenize and /detokenize)",
    )
    server.add_argument(
        "--worker-metrics-url",
        action="append",
        default=None,
        metavar="URL",
        help="A decode worker's Prometheus endpoint, e.g. http://127.0.0.1:PORT (repeat for "
        "several workers). Scraped before and after each run to report the run's KV pulls as "
        "the workers measured them (pdserve:kv_pull_seconds and pdserve:kv_pull_bytes, from "
        "start_pull until the blocks are usable) beside the connector's own "
        "vllm:nixl_xfer_time_seconds. `pdserve serve` prints each worker's 'metrics on port "
        "PORT' once ready; a worker started alone serves it at its --metrics-host and "
        "--metrics-port (also metrics_port in its --ready-file). A prompt the decode worker "
        "already holds is not pulled again, and warm-ups (--num-warmups) and every --request-rate "
        "after the first resend the run's prompts: measure pulls with one rate per run, each "
        "with a --seed of its own.",
    )
    server.add_argument(
        "--ready-check-timeout-sec",
        type=float,
        default=600.0,
        help="Seconds to wait for the server's /v1/models to answer before starting.",
    )

    data = parser.add_argument_group("dataset")
    data.add_argument(
        "--dataset-name",
        choices=DATASET_NAMES,
        default="random",
        help="Requests to send: random words of given lengths, prefix_repetition (shared prefixes), "
        "sharegpt (a ShareGPT-style JSON file), trace (a Mooncake-style JSONL trace replayed on "
        "its timestamps), json (answers constrained to a JSON schema: response_format json_schema "
        "on chat, structured_outputs.json on completions; the valid answers are counted), "
        "json-unique (json with a schema of its own for every request).",
    )
    data.add_argument("--dataset-path", default=None, help="The file of --dataset-name sharegpt or trace.")
    data.add_argument(
        "--num-prompts", type=int, default=1000, help="Requests to send (a trace: its first N lines)."
    )
    data.add_argument(
        "--seed", type=int, default=0, help="Seed of the prompts and the request arrival times."
    )
    data.add_argument("--random-input-len", type=int, default=1024, help="random: prompt tokens per request.")
    data.add_argument("--random-output-len", type=int, default=128, help="random: output tokens per request.")
    data.add_argument(
        "--random-range-ratio",
        type=float,
        default=0.0,
        help="random: lengths are drawn uniformly from [len*(1-r), len*(1+r)]; 0 <= r < 1.",
    )
    data.add_argument(
        "--random-prefix-len",
        type=int,
        default=0,
        help="random: tokens of one prefix shared by every prompt, before --random-input-len "
        "tokens of its own.",
    )
    data.add_argument(
        "--prefix-repetition-prefix-len",
        type=int,
        default=256,
        help="prefix_repetition: tokens of each shared prefix.",
    )
    data.add_argument(
        "--prefix-repetition-suffix-len",
        type=int,
        default=256,
        help="prefix_repetition: tokens after the prefix, different in every prompt.",
    )
    data.add_argument(
        "--prefix-repetition-num-prefixes",
        type=int,
        default=10,
        help="prefix_repetition: distinct prefixes, each shared by an equal share of the prompts.",
    )
    data.add_argument(
        "--prefix-repetition-output-len",
        type=int,
        default=128,
        help="prefix_repetition: output tokens per request.",
    )
    data.add_argument(
        "--sharegpt-output-len",
        type=int,
        default=None,
        help="sharegpt: output tokens per request. (default: the reply's length in the file)",
    )
    data.add_argument(
        "--json-schema-path",
        default=None,
        help="json, json-unique: a JSON file with the schema every request asks for, or a list of "
        "schemas taken in turn. (default: five built-in schemas: a user profile, a product, a "
        "calendar event, an order, a book review)",
    )
    data.add_argument(
        "--json-output-len",
        type=int,
        default=512,
        help="json, json-unique: output tokens per request at most (an answer ends where its "
        "schema does; the built-in ones fit in about 300 tokens); an answer cut short there is "
        "not valid JSON and counts as invalid.",
    )
    data.add_argument(
        "--structured-output-ratio",
        type=float,
        default=1.0,
        help="json, json-unique: share of the requests constrained to their schema (chosen at "
        "random); the others ask the same in free text. 0 measures the same prompts unconstrained.",
    )
    data.add_argument(
        "--trace-time-scale",
        type=float,
        default=1.0,
        help="trace: multiply the trace's timestamps by this (0.5 replays twice as fast, 0 sends "
        "everything at once).",
    )
    data.add_argument(
        "--trace-block-size",
        type=int,
        default=512,
        help="trace: tokens per hash_ids block (Mooncake traces use 512).",
    )

    load = parser.add_argument_group("load")
    load.add_argument(
        "--request-rate",
        default="inf",
        help="Requests per second, or a comma-separated list (e.g. 1,2,4) for one run per rate; "
        "inf sends every request at once. Ignored by --dataset-name trace.",
    )
    load.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="Shape of the gamma distribution of the gaps between requests: 1 is a Poisson "
        "process, below 1 burstier, above 1 more even.",
    )
    load.add_argument(
        "--max-concurrency",
        type=int,
        default=None,
        help="Requests in flight at most; the others wait for a slot. (default: no limit)",
    )
    load.add_argument(
        "--num-warmups", type=int, default=0, help="Requests sent (and not counted) before the measured run."
    )
    load.add_argument(
        "--ignore-eos",
        action="store_true",
        help="Ask the server to ignore EOS, so every output has its full length.",
    )
    load.add_argument(
        "--temperature", type=float, default=None, help="Sampling temperature. (default: 0, greedy)"
    )
    load.add_argument("--top-p", type=float, default=None, help="Sampling top_p. (default: the server's)")
    load.add_argument("--top-k", type=int, default=None, help="Sampling top_k. (default: the server's)")
    load.add_argument("--min-p", type=float, default=None, help="Sampling min_p. (default: the server's)")
    load.add_argument(
        "--extra-body",
        default=None,
        metavar="JSON",
        help="JSON object merged into every request body, e.g. '{\"min_tokens\": 8}'.",
    )

    out = parser.add_argument_group("results")
    out.add_argument(
        "--goodput",
        nargs="+",
        default=None,
        metavar="NAME:MS",
        help="SLOs for goodput, e.g. --goodput ttft:500 tpot:50 e2el:5000 (milliseconds): the "
        "requests per second that met every one.",
    )
    out.add_argument(
        "--percentile-metrics",
        default="ttft,tpot,itl",
        help=f"Comma-separated metrics to report percentiles of, from {','.join(LATENCY_METRICS)}.",
    )
    out.add_argument(
        "--metric-percentiles", default="99", help="Comma-separated percentiles to report, e.g. 25,50,99."
    )
    out.add_argument("--save-result", action="store_true", help="Write the result as JSON.")
    out.add_argument(
        "--save-detailed",
        action="store_true",
        help="With --save-result, add every request's lengths, timings, text and error.",
    )
    out.add_argument("--result-dir", default=None, help="Folder for the JSON result. (default: .)")
    out.add_argument(
        "--result-filename",
        default=None,
        help="Name of the JSON result (with several rates, -RATEqps is added before .json). "
        "(default: BACKEND-RATEqps[-concurrencyN]-MODEL-DATE.json)",
    )
    out.add_argument(
        "--metadata",
        nargs="*",
        default=None,
        metavar="KEY=VALUE",
        help="Extra KEY=VALUE pairs written into the JSON result (device, commit, ...).",
    )
    out.add_argument(
        "--label", default=None, help="Label of the run, written in the JSON result and its name."
    )
    out.add_argument(
        "--plot",
        default=None,
        metavar="DIR",
        help="Write PNG charts into DIR: latency CDFs, and throughput against rate when "
        "several rates ran (needs matplotlib).",
    )
    out.add_argument("--disable-tqdm", action="store_true", help="Do not draw the progress bar.")


@dataclass(frozen=True)
class Choices:
    """The flags that need parsing, parsed once (before the server is reached)."""

    rates: list[float]
    metric_names: list[str]
    percentiles: list[float]
    slos: dict[str, float] | None
    extra_body: dict[str, Any]
    metadata: dict[str, str]
    worker_metrics_urls: list[str]  # each ending in /metrics

    @classmethod
    def of(cls, args: argparse.Namespace) -> Choices:
        return cls(
            rates=parse_request_rates(args.request_rate),
            metric_names=_parse_metric_names(args.percentile_metrics),
            percentiles=_parse_percentiles(args.metric_percentiles),
            slos=parse_goodput(args.goodput) if args.goodput else None,
            extra_body=_parse_extra_body(args.extra_body),
            metadata=_parse_metadata(args.metadata),
            worker_metrics_urls=[metrics_url(url) for url in args.worker_metrics_url or ()],
        )


def resolve_backend(backend: str | None, endpoint: str | None) -> tuple[str, str]:
    """(backend, endpoint) from what was given: each defaults from the other."""
    if endpoint is None:
        backend = backend or "openai"
        return backend, BACKENDS[backend]
    if not endpoint.startswith("/"):
        raise ValueError(f"--endpoint {endpoint!r} must be a path starting with /, e.g. /v1/completions")
    chat = endpoint.rstrip("/").endswith(CHAT_SUFFIX)
    if backend is None:
        return ("openai-chat" if chat else "openai"), endpoint
    if chat != (backend == "openai-chat"):
        raise ValueError(
            f"--backend {backend} does not match --endpoint {endpoint}: use --backend openai-chat with "
            "/v1/chat/completions and --backend openai with /v1/completions"
        )
    return backend, endpoint


def parse_request_rates(text: str) -> list[float]:
    """ "1,2,4" → [1.0, 2.0, 4.0]; "inf" → [inf]."""
    rates = []
    for item in text.split(","):
        try:
            rate = float(item.strip())
        except ValueError:
            raise ValueError(f"--request-rate {text!r}: {item.strip()!r} is not a number or inf") from None
        if not rate > 0:
            raise ValueError(f"--request-rate {text!r}: every rate must be above 0 (inf sends all at once)")
        rates.append(rate)
    return rates


def _parse_metric_names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in LATENCY_METRICS]
    if unknown:
        raise ValueError(f"--percentile-metrics: unknown {unknown}; choose from {','.join(LATENCY_METRICS)}")
    return names


def _parse_percentiles(text: str) -> list[float]:
    try:
        values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ValueError(f"--metric-percentiles {text!r}: write numbers, e.g. 50,90,99") from None
    if not values or any(not 0 < p <= 100 for p in values):
        raise ValueError(f"--metric-percentiles {text!r}: every percentile must be in (0, 100]")
    return values


def _parse_extra_body(text: str | None) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--extra-body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise ValueError("--extra-body must be a JSON object, e.g. '{\"min_tokens\": 8}'")
    return body


def _parse_metadata(items: list[str] | None) -> dict[str, str]:
    metadata = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--metadata {item!r}: write KEY=VALUE")
        metadata[key] = value
    return metadata
