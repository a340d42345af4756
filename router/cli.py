"""`pdserve router`: the OpenAI-compatible front door, in front of running workers.

    pdserve router --decode-workers tcp://10.0.0.5:9100,tcp://10.0.0.6:9100 \\
                   --prefill-workers tcp://10.0.0.7:9100 --model /models/llama --port 8000

The router loads only the tokenizer and the model's config (no weights, no torch), so
it starts in seconds on any host. Give it the workers' model flags (--model,
--tokenizer, --max-model-len, --generation-config ...) so it validates requests as they
would. uvicorn runs in this process.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import fields
from typing import Any

from common.config.arg_parser import ConfigFileAction, JsonObjectAction
from common.config.arg_types import choice, human_int, int_at_least
from common.frame_auth import SECRET_ENV, SECRET_FILE_ENV, load_cluster_secret
from router.config import (
    DEFAULT_HOST,
    DEFAULT_MAX_CONCURRENT_REQUESTS,
    DEFAULT_MAX_EVENT_SIZE,
    DEFAULT_MAX_HEADER_COUNT,
    DEFAULT_MAX_QUEUE_WAIT_S,
    DEFAULT_MAX_QUEUED_REQUESTS,
    DEFAULT_PORT,
    DEFAULT_WORKER_HEALTH_TIMEOUT_S,
    DEFAULT_WORKER_REPLY_TIMEOUT_S,
    ENDPOINT_ACCESS,
    RouterConfig,
)
from router.model_info import ModelSettings
from router.policy import DEFAULT_LOCAL_PREFILL_THRESHOLD, PolicyWeights

logger = logging.getLogger("pdserve.router")

API_KEY_ENV = "PDSERVE_API_KEY"
VLLM_API_KEY_ENV = "VLLM_API_KEY"
BLOCK_SIZES = (1, 8, 16, 32, 64, 128)
HASH_ALGOS = ("sha256", "sha256_cbor", "xxhash", "xxhash_cbor")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
# uvicorn's own header limit sits above ours, so an oversized header block gets our 431
# (uvicorn would answer a bare 400) and only a grossly oversized one reaches uvicorn's.
_UVICORN_HEADER_SLACK = 64 * 1024


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "router",
        help="Start the OpenAI-compatible router in front of the workers.",
        description="Start the OpenAI-compatible router: it validates and tokenizes requests, routes "
        "them by cached prefix and load to the prefill and decode workers, and streams the answers.",
    )
    add_router_args(parser)
    parser.set_defaults(func=run)


def _address_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _registry_url(text: str) -> str:
    from common.registry import check_registry_url

    try:
        return check_registry_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a number of seconds") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: must be more than 0 seconds")
    return value


def add_router_args(parser: argparse.ArgumentParser) -> None:
    server = parser.add_argument_group("server")
    server.add_argument(
        "--config",
        action=ConfigFileAction,
        default=None,
        help="Read options from a YAML file whose keys are option names without the leading -- "
        "(e.g. 'port: 8000'). Options given on the command line win over the file.",
    )
    server.add_argument("--host", default=DEFAULT_HOST, help="Host name or address to listen on.")
    server.add_argument("--port", type=int_at_least(0), default=DEFAULT_PORT, help="Port to listen on.")
    server.add_argument(
        "--api-key",
        nargs="+",
        default=None,
        metavar="KEY",
        help="If given, the /v1 endpoints, /tokenize and /detokenize require 'Authorization: Bearer "
        "<key>' with one of these keys (401 otherwise). Keys on the command line are visible to "
        f"other local users (ps); prefer the {API_KEY_ENV} or {VLLM_API_KEY_ENV} environment "
        "variable (several keys separated by commas). (default: no key)",
    )
    server.add_argument(
        "--metrics-access",
        type=choice(ENDPOINT_ACCESS),
        default="public",
        help="Who may read /metrics: public (anyone, as in vLLM), api-key (only with an --api-key), "
        "or disabled (404).",
    )
    server.add_argument(
        "--health-access",
        type=choice(ENDPOINT_ACCESS[:2]),
        default="public",
        help="Who may read /health and /ping (they list the workers and their load): public or "
        "api-key. Load balancers then need the key.",
    )
    server.add_argument(
        "--cluster-secret-file",
        default=None,
        metavar="PATH",
        help="A file holding the cluster secret the workers were given: messages to and from the "
        "workers carry its HMAC tag, and those without a valid one are dropped. Also read from "
        f"${SECRET_FILE_ENV}, or the secret itself from ${SECRET_ENV}. (default: none; see "
        "docs/security.md)",
    )
    server.add_argument(
        "--enable-log-requests",
        action="store_true",
        help="Log every request body (prompts included) at INFO. Off by default: prompts are "
        "never logged otherwise, and API keys never.",
    )
    server.add_argument(
        "--max-log-len",
        type=int_at_least(0),
        default=None,
        help="With --enable-log-requests, the most characters of a request body that are logged. "
        "(default: no limit)",
    )
    server.add_argument(
        "--enable-request-id-headers",
        action="store_true",
        help="Add an X-Request-Id header to every response (a client's own X-Request-Id is always echoed).",
    )
    server.add_argument(
        "--h11-max-incomplete-event-size",
        type=human_int(minimum=1024),
        default=DEFAULT_MAX_EVENT_SIZE,
        help="Largest request header block or body in bytes; larger ones are refused with 431 "
        "(headers) or 413 (body).",
    )
    server.add_argument(
        "--h11-max-header-count",
        type=int_at_least(1),
        default=DEFAULT_MAX_HEADER_COUNT,
        help="Most header lines a request may have; more are refused with 431.",
    )
    server.add_argument(
        "--max-concurrent-requests",
        type=int_at_least(1),
        default=DEFAULT_MAX_CONCURRENT_REQUESTS,
        help="Generation requests the router answers at once; more wait in a bounded queue "
        "(--max-queued-requests), and beyond that get 429 with Retry-After. (default: what the "
        "decode workers can run at once, the sum of their --max-num-seqs)",
    )
    server.add_argument(
        "--max-queued-requests",
        type=int_at_least(0),
        default=DEFAULT_MAX_QUEUED_REQUESTS,
        help="Generation requests that may wait, first come first served, for one in flight to "
        "finish; beyond it new ones get 429 with Retry-After at once. 0 refuses whatever "
        "cannot start now. (default: the --max-concurrent-requests limit)",
    )
    server.add_argument(
        "--max-queue-wait",
        type=_positive_float,
        default=DEFAULT_MAX_QUEUE_WAIT_S,
        help="Seconds a queued request waits for its turn before it gets 429 with Retry-After.",
    )
    server.add_argument(
        "--uvicorn-log-level", type=choice(LOG_LEVELS), default="info", help="Log level of the HTTP server."
    )
    server.add_argument(
        "--disable-uvicorn-access-log", action="store_true", help="Do not log every HTTP request."
    )

    workers = parser.add_argument_group("workers and routing")
    workers.add_argument(
        "--decode-workers",
        type=_address_list,
        action="extend",
        default=[],
        metavar="ADDR[,ADDR...]",
        help="The decode workers' --worker-address values (tcp://HOST:PORT), comma-separated or "
        "the flag repeated. At least one is needed unless --registry is given; without prefill workers they prefill too "
        "(an aggregated deployment).",
    )
    workers.add_argument(
        "--prefill-workers",
        type=_address_list,
        action="extend",
        default=[],
        metavar="ADDR[,ADDR...]",
        help="The prefill workers' --worker-address values (tcp://HOST:PORT), comma-separated or "
        "the flag repeated. (default: none)",
    )
    workers.add_argument(
        "--registry",
        type=_registry_url,
        default=None,
        metavar="redis://HOST:PORT/DB",
        help="Find the workers in this Redis worker registry (the workers' --registry): workers "
        "that register are added, those whose record is gone are removed; while Redis is down the "
        "known workers stay. Several routers may share one registry. Combines with "
        "--decode-workers / --prefill-workers, which always stay. (default: no registry)",
    )
    workers.add_argument(
        "--local-prefill-threshold",
        type=human_int(minimum=0),
        default=DEFAULT_LOCAL_PREFILL_THRESHOLD,
        help="When the part of a prompt that the chosen decode worker does not hold in its "
        "prefix cache is shorter than this many tokens, that decode worker prefills it itself "
        "instead of a prefill worker (conditional disaggregation). 0 sends every prompt to a "
        "prefill worker.",
    )
    workers.add_argument(
        "--routing-weights",
        action=JsonObjectAction,
        from_dict=PolicyWeights.from_dict,
        default=PolicyWeights(),
        help="Weights of the routing scorers, as JSON: "
        + ", ".join(f"{f.name} (default {f.default})" for f in fields(PolicyWeights))
        + ". Set keys one at a time with --routing-weights.KEY VALUE. The defaults are the ones "
        "`pdserve bench route` chose on the Mooncake trace; docs/routing.md says what each does and why.",
    )
    workers.add_argument(
        "--block-size",
        type=choice(BLOCK_SIZES, int),
        default=None,
        help="The workers' KV-cache block size, for hashing prompts into blocks. (default: what the "
        "workers report, else 16)",
    )
    workers.add_argument(
        "--prefix-caching-hash-algo",
        type=choice(HASH_ALGOS),
        default=None,
        help=f"The workers' prefix-caching hash algorithm, one of {', '.join(HASH_ALGOS)}; it must "
        "match theirs (and PYTHONHASHSEED must too) for prefix-aware routing. (default: what the "
        "workers report, else sha256)",
    )
    workers.add_argument(
        "--worker-health-timeout",
        type=_positive_float,
        default=DEFAULT_WORKER_HEALTH_TIMEOUT_S,
        help="Seconds without a load report after which a worker is taken out of routing and the "
        "requests open on it fail.",
    )
    workers.add_argument(
        "--worker-reply-timeout",
        type=_positive_float,
        default=DEFAULT_WORKER_REPLY_TIMEOUT_S,
        help="Seconds a request waits for its worker's next message before it fails.",
    )
    workers.add_argument(
        "--router-id", default=None, help="This router's name towards the workers. (default: random)"
    )

    model = parser.add_argument_group("model (give the workers' values)")
    model.add_argument(
        "--model",
        default=None,
        help="Name or path of the model the workers serve: a local folder, a .gguf file, or a Hub id. "
        "Only its tokenizer and config are read. (default: the embedded SmolLM2-135M-Instruct)",
    )
    model.add_argument(
        "--tokenizer",
        default=None,
        help="Name or path of the tokenizer. If unspecified, the model's is used.",
    )
    model.add_argument(
        "--revision", default=None, help="The model version on the Hub (branch, tag or commit)."
    )
    model.add_argument("--download-dir", default=None, help="Where Hub downloads are kept.")
    model.add_argument(
        "--hf-config-path", default=None, help="Path of the config.json to use instead of the model's."
    )
    model.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="The model name(s) used in the API; the first is reported in responses. (default: the "
        "model's name)",
    )
    model.add_argument(
        "--max-model-len",
        type=human_int(minimum=1),
        default=None,
        help="Model context length (prompt and output); longer requests get 400. (default: the "
        "model config's)",
    )
    model.add_argument(
        "--max-logprobs",
        type=int_at_least(-1),
        default=20,
        help="Most logprobs a request may ask for; -1 means no cap.",
    )
    model.add_argument(
        "--generation-config",
        default="auto",
        help='Where the sampling defaults come from: "auto" the model folder\'s generation_config.json, '
        '"vllm" none, or a folder holding one.',
    )
    model.add_argument(
        "--override-generation-config",
        action=JsonObjectAction,
        default={},
        help='Overrides or sets generation config defaults, e.g. {"temperature": 0.5}.',
    )
    model.add_argument(
        "--chat-template",
        default=None,
        help="The file path to the chat template, or the template in single-line form. (default: the "
        "tokenizer's)",
    )
    model.add_argument("--response-role", default="assistant", help="The role of chat completion responses.")
    model.add_argument(
        "--enable-prompt-tokens-details",
        action="store_true",
        help="Add usage.prompt_tokens_details.cached_tokens to responses.",
    )


def api_keys_from_env() -> list[str] | None:
    """The keys in $PDSERVE_API_KEY, else $VLLM_API_KEY (comma-separated); None when unset."""
    text = os.environ.get(API_KEY_ENV) or os.environ.get(VLLM_API_KEY_ENV) or ""
    keys = [key.strip() for key in text.split(",") if key.strip()]
    return keys or None


def config_from_args(args: argparse.Namespace) -> tuple[RouterConfig, ModelSettings]:
    """ValueError when the cluster secret cannot be read."""
    router_config = RouterConfig(
        prefill_workers=list(args.prefill_workers),
        decode_workers=list(args.decode_workers),
        host=args.host,
        port=args.port,
        api_key=args.api_key or api_keys_from_env(),
        metrics_access=args.metrics_access,
        health_access=args.health_access,
        cluster_secret=load_cluster_secret(args.cluster_secret_file),
        enable_log_requests=args.enable_log_requests,
        max_log_len=args.max_log_len,
        local_prefill_threshold=args.local_prefill_threshold,
        block_size=args.block_size,
        prefix_caching_hash_algo=args.prefix_caching_hash_algo,
        policy_weights=args.routing_weights,
        worker_health_timeout_s=args.worker_health_timeout,
        worker_reply_timeout_s=args.worker_reply_timeout,
        max_concurrent_requests=args.max_concurrent_requests,
        max_queued_requests=args.max_queued_requests,
        max_queue_wait_s=args.max_queue_wait,
        max_event_size=args.h11_max_incomplete_event_size,
        max_header_count=args.h11_max_header_count,
        enable_request_id_headers=args.enable_request_id_headers,
        router_id=args.router_id,
        registry=args.registry,
    )
    settings = ModelSettings(
        model=args.model,
        tokenizer=args.tokenizer,
        revision=args.revision,
        download_dir=args.download_dir,
        hf_config_path=args.hf_config_path,
        served_model_name=args.served_model_name,
        max_model_len=args.max_model_len,
        max_logprobs=args.max_logprobs,
        generation_config=args.generation_config,
        override_generation_config=dict(args.override_generation_config or {}),
        chat_template=args.chat_template,
        response_role=args.response_role,
        enable_prompt_tokens_details=args.enable_prompt_tokens_details,
    )
    return router_config, settings


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config, settings = config_from_args(args)
        config.validate()
        from router.model_info import load_served_model

        served = load_served_model(settings)
    except ValueError as exc:
        print(f"pdserve router: {exc}", file=sys.stderr)
        return 1

    import uvicorn

    from common.registry import redacted
    from router.app import create_app

    app = create_app(config, served)
    logger.info(
        "serving %s on http://%s:%d (decode workers: %s; prefill workers: %s%s)",
        served.name, config.host, config.port, ", ".join(config.decode_workers) or "none",
        ", ".join(config.prefill_workers) or "none",
        f"; and those in the registry {redacted(config.registry)}" if config.registry else "",
    )  # fmt: skip
    uvicorn.run(
        app,
        host=config.host,
        port=config.port,
        log_level=args.uvicorn_log_level,
        access_log=not args.disable_uvicorn_access_log,
        http="h11",
        h11_max_incomplete_event_size=config.max_event_size + _UVICORN_HEADER_SLACK,
        timeout_graceful_shutdown=5,
    )
    return 0


if __name__ == "__main__":
    from common.config.arg_parser import PdserveArgumentParser

    _parser = PdserveArgumentParser(prog="pdserve router")
    add_router_args(_parser)
    sys.exit(run(_parser.parse_args()))
