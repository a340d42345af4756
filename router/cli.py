"""`pdserve router`: the OpenAI-compatible front door, in front of running workers.

    pdserve router --decode-workers tcp://10.0.0.5:9100,tcp://10.0.0.6:9100 \\
                   --prefill-workers tcp://10.0.0.7:9100 --model /models/llama --port 8000

The router loads only the tokenizer and the model's config (no weights, no torch), so
it starts in seconds on any host. Give it the workers' model flags (--model,
--tokenizer, --max-model-len, --generation-config ...; declared once for both in
common/config/shared_args.py) so it validates requests as they would. Its own flags are
declared here once; `pdserve serve` takes add_router_serving_args as they are. uvicorn
runs in this process.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import fields
from typing import Any

from common.config.arg_parser import JsonObjectAction, add_config_file_arg
from common.config.arg_types import choice, human_int, int_at_least, registry_url, seconds
from common.config.lora_config import RUNTIME_LORA_UPDATING_ENV, add_lora_args, lora_config_from_args
from common.config.shared_args import add_block_hashing_args, add_cluster_secret_arg, add_model_args
from common.config.structured_outputs_config import (
    add_structured_outputs_args,
    structured_outputs_config_from_args,
)
from common.frame_auth import load_cluster_secret
from common.openai_api.served_model import AUTO_TOOL_CHOICE_NEEDS_PARSER
from common.openai_api.tool_calls import TOOL_PARSERS
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

# one object, so `pdserve serve` shows the router's own text (tests/cli/test_serve.py)
RUNTIME_LORA_UPDATING_HELP = (
    "Serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter, which load a LoRA adapter "
    "from a folder on every worker, or unload one, while the server runs (docs/lora.md). Off by "
    f"default, as in vLLM, where {RUNTIME_LORA_UPDATING_ENV}=1 turns them on (which works here too): "
    "anyone who may call the API can then make the workers read a folder."
)

logger = logging.getLogger("pdserve.router")

API_KEY_ENV = "PDSERVE_API_KEY"
VLLM_API_KEY_ENV = "VLLM_API_KEY"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
# uvicorn's own header limit sits above ours, so an oversized header block gets our 431
# (uvicorn would answer a bare 400) and only a grossly oversized one reaches uvicorn's.
_UVICORN_HEADER_SLACK = 64 * 1024
# Help texts that are built, built once: `pdserve serve` shows the very same objects.
_API_KEY_HELP = (
    "If given, the /v1 endpoints, /tokenize and /detokenize require 'Authorization: Bearer "
    "<key>' with one of these keys (401 otherwise). Keys on the command line are visible to "
    f"other local users (ps); prefer the {API_KEY_ENV} or {VLLM_API_KEY_ENV} environment "
    "variable (several keys separated by commas); `pdserve serve` hands its --api-key to the "
    "router that way. (default: no key)"
)
_ROUTING_WEIGHTS_HELP = (
    "Weights of the routing scorers, as JSON: "
    + ", ".join(f"{f.name} (default {f.default})" for f in fields(PolicyWeights))
    + ". Set keys one at a time with --routing-weights.KEY VALUE. The defaults are the ones "
    "`pdserve bench route` chose on the Mooncake trace; docs/routing.md says what each does and why."
)


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


def add_router_args(parser: argparse.ArgumentParser) -> None:
    """Every flag of `pdserve router`."""
    add_config_file_arg(parser.add_argument_group("config file"))
    add_router_serving_args(parser)
    add_router_worker_args(parser.add_argument_group("workers"))
    model = parser.add_argument_group("model (give the workers' values)")
    add_model_args(model)
    add_block_hashing_args(model)
    # the JSON defaults and the backend of requests' constraints, checked here before any worker
    add_structured_outputs_args(parser.add_argument_group("structured outputs (give the workers' values)"))
    # the adapters served by name; `pdserve serve` takes these with the engine flags
    add_lora_args(parser.add_argument_group("LoRA adapters (give the workers' values)"))


def add_router_serving_args(parser: argparse.ArgumentParser) -> None:
    """The router's flags for serving the API and routing requests: everything but where its
    workers are, which `pdserve serve` takes as they are and passes on."""
    _add_server_args(parser.add_argument_group("server"))
    _add_admission_args(parser.add_argument_group("admission and HTTP limits"))
    _add_routing_args(parser.add_argument_group("routing"))
    _add_api_args(parser.add_argument_group("API responses"))


def add_router_worker_args(group: Any) -> None:
    """Which workers the router routes to, and its name towards them."""
    group.add_argument(
        "--decode-workers",
        type=_address_list,
        action="extend",
        default=[],
        metavar="ADDR[,ADDR...]",
        help="The decode workers' --worker-address values (tcp://HOST:PORT), comma-separated or "
        "the flag repeated. At least one is needed unless --registry is given; without prefill workers they prefill too "
        "(an aggregated deployment).",
    )
    group.add_argument(
        "--prefill-workers",
        type=_address_list,
        action="extend",
        default=[],
        metavar="ADDR[,ADDR...]",
        help="The prefill workers' --worker-address values (tcp://HOST:PORT), comma-separated or "
        "the flag repeated. (default: none)",
    )
    group.add_argument(
        "--registry",
        type=registry_url,
        default=None,
        metavar="redis://HOST:PORT/DB",
        help="Find the workers in this Redis worker registry (the workers' --registry): workers "
        "that register are added, those whose record is gone are removed; while Redis is down the "
        "known workers stay. Several routers may share one registry. Combines with "
        "--decode-workers / --prefill-workers, which always stay. (default: no registry)",
    )
    group.add_argument(
        "--router-id", default=None, help="This router's name towards the workers. (default: random)"
    )


def _add_server_args(group: Any) -> None:
    group.add_argument("--host", default=DEFAULT_HOST, help="Host name or address to listen on.")
    group.add_argument(
        "--port", type=int_at_least(0), default=DEFAULT_PORT, help="Port to listen on; 0 picks a free one."
    )
    group.add_argument(
        "--api-key",
        nargs="+",
        default=None,
        metavar="KEY",
        help=_API_KEY_HELP,
    )
    group.add_argument(
        "--metrics-access",
        type=choice(ENDPOINT_ACCESS),
        default="public",
        help="Who may read /metrics: public (anyone, as in vLLM), api-key (only with an --api-key), "
        "or disabled (404).",
    )
    group.add_argument(
        "--health-access",
        type=choice(ENDPOINT_ACCESS[:2]),
        default="public",
        help="Who may read /health and /ping (they list the workers and their load): public or "
        "api-key. Load balancers then need the key.",
    )
    add_cluster_secret_arg(group)
    group.add_argument(
        "--enable-log-requests",
        action="store_true",
        help="Log every request body (prompts included) at INFO. Off by default: prompts are "
        "never logged otherwise, and API keys never.",
    )
    group.add_argument(
        "--max-log-len",
        type=int_at_least(0),
        default=None,
        help="With --enable-log-requests, the most characters of a request body that are logged. "
        "(default: no limit)",
    )
    group.add_argument(
        "--uvicorn-log-level", type=choice(LOG_LEVELS), default="info", help="Log level of the HTTP server."
    )
    group.add_argument(
        "--disable-uvicorn-access-log", action="store_true", help="Do not log every HTTP request."
    )


def _add_admission_args(group: Any) -> None:
    group.add_argument(
        "--h11-max-incomplete-event-size",
        type=human_int(minimum=1024),
        default=DEFAULT_MAX_EVENT_SIZE,
        help="Largest request header block or body in bytes; larger ones are refused with 431 "
        "(headers) or 413 (body).",
    )
    group.add_argument(
        "--h11-max-header-count",
        type=int_at_least(1),
        default=DEFAULT_MAX_HEADER_COUNT,
        help="Most header lines a request may have; more are refused with 431.",
    )
    group.add_argument(
        "--max-concurrent-requests",
        type=int_at_least(1),
        default=DEFAULT_MAX_CONCURRENT_REQUESTS,
        help="Generation requests the router answers at once; more wait in a bounded queue "
        "(--max-queued-requests), and beyond that get 429 with Retry-After. (default: what the "
        "decode workers can run at once, the sum of their --max-num-seqs)",
    )
    group.add_argument(
        "--max-queued-requests",
        type=int_at_least(0),
        default=DEFAULT_MAX_QUEUED_REQUESTS,
        help="Generation requests that may wait, first come first served, for one in flight to "
        "finish; beyond it new ones get 429 with Retry-After at once. 0 refuses whatever "
        "cannot start now. (default: the --max-concurrent-requests limit)",
    )
    group.add_argument(
        "--max-queue-wait",
        type=seconds(),
        default=DEFAULT_MAX_QUEUE_WAIT_S,
        help="Seconds a queued request waits for its turn before it gets 429 with Retry-After.",
    )


def _add_routing_args(group: Any) -> None:
    group.add_argument(
        "--local-prefill-threshold",
        type=human_int(minimum=0),
        default=DEFAULT_LOCAL_PREFILL_THRESHOLD,
        help="When the part of a prompt that the chosen decode worker does not hold in its "
        "prefix cache is shorter than this many tokens, that decode worker prefills it itself "
        "instead of a prefill worker (conditional disaggregation). 0 sends every prompt to a "
        "prefill worker.",
    )
    add_routing_weights_arg(group)
    group.add_argument(
        "--worker-health-timeout",
        type=seconds(),
        default=DEFAULT_WORKER_HEALTH_TIMEOUT_S,
        help="Seconds without a load report after which a worker is taken out of routing and the "
        "requests open on it fail.",
    )
    group.add_argument(
        "--worker-reply-timeout",
        type=seconds(),
        default=DEFAULT_WORKER_REPLY_TIMEOUT_S,
        help="Seconds a request waits for its worker's next message before it fails.",
    )


def add_routing_weights_arg(group: Any) -> None:
    """--routing-weights, also taken by `pdserve bench route` to replay the router's policy."""
    group.add_argument(
        "--routing-weights",
        action=JsonObjectAction,
        from_dict=PolicyWeights.from_dict,
        default=PolicyWeights(),
        help=_ROUTING_WEIGHTS_HELP,
    )


def _add_api_args(group: Any) -> None:
    group.add_argument("--response-role", default="assistant", help="The role of chat completion responses.")
    group.add_argument(
        "--enable-prompt-tokens-details",
        action="store_true",
        help="Add usage.prompt_tokens_details.cached_tokens to responses.",
    )
    group.add_argument(
        "--enable-request-id-headers",
        action="store_true",
        help="Add an X-Request-Id header to every response (a client's own X-Request-Id is always echoed).",
    )
    add_tool_calling_args(group)
    group.add_argument(
        "--allow-runtime-lora-updating",
        action="store_true",
        help=RUNTIME_LORA_UPDATING_HELP,
    )


def runtime_lora_updating_allowed(args: argparse.Namespace) -> bool:
    """--allow-runtime-lora-updating, or $VLLM_ALLOW_RUNTIME_LORA_UPDATING set to 1 or true as vLLM reads it."""
    from_env = os.environ.get(RUNTIME_LORA_UPDATING_ENV, "0").strip().lower() in ("1", "true")
    return bool(args.allow_runtime_lora_updating) or from_env


def add_tool_calling_args(group: Any) -> None:
    """vLLM's tool-calling flags (docs/structured-outputs.md, "Tool calling and reasoning")."""
    group.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help='Enable auto tool choice for supported models: tool_choice "auto" (the default when a '
        "request sends tools) lets the model decide, and --tool-call-parser reads its calls. Needs "
        '--tool-call-parser. Without it, requests may still force calls with tool_choice "required" '
        "or a named function.",
    )
    group.add_argument(
        "--tool-call-parser",
        type=choice(tuple(TOOL_PARSERS)),
        choices=tuple(TOOL_PARSERS),
        default=None,
        help="Select the tool call parser depending on the model that you're using: the format the "
        "model writes its calls in (hermes: Hermes 2 Pro, Qwen2.5, Qwen3; llama3_json and "
        "llama4_json: Llama 3.1 and later; mistral; qwen3_coder). This is used to parse the "
        "model-generated tool call into OpenAI API format. Required for --enable-auto-tool-choice. "
        "(default: none)",
    )
    group.add_argument(
        "--exclude-tools-when-tool-choice-none",
        action="store_true",
        help='If specified, exclude tool definitions in prompts when tool_choice is "none" (by '
        "default the chat template shows them anyway).",
    )


def check_tool_calling_args(args: argparse.Namespace) -> None:
    """vLLM's start-up check; ValueError before anything starts."""
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        raise ValueError(
            f"{AUTO_TOOL_CHOICE_NEEDS_PARSER} (the format the model writes its calls in: "
            f"{', '.join(TOOL_PARSERS)})"
        )


def api_keys_from_env() -> list[str] | None:
    """The keys in $PDSERVE_API_KEY, else $VLLM_API_KEY (comma-separated); None when unset."""
    text = os.environ.get(API_KEY_ENV) or os.environ.get(VLLM_API_KEY_ENV) or ""
    keys = [key.strip() for key in text.split(",") if key.strip()]
    return keys or None


def config_from_args(args: argparse.Namespace) -> tuple[RouterConfig, ModelSettings]:
    """ValueError when the cluster secret cannot be read, or the tool-calling or LoRA flags do not fit."""
    check_tool_calling_args(args)
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
        lora=lora_config_from_args(args),
        allow_runtime_lora_updating=runtime_lora_updating_allowed(args),
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
        structured_outputs=structured_outputs_config_from_args(args),
        enable_auto_tool_choice=args.enable_auto_tool_choice,
        tool_call_parser=args.tool_call_parser,
        exclude_tools_when_tool_choice_none=args.exclude_tools_when_tool_choice_none,
    )
    return router_config, settings


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config, settings = config_from_args(args)
        config.validate()
        from router.app import create_app
        from router.model_info import load_served_model

        served = load_served_model(settings)
        app = create_app(config, served)  # a --lora-modules name that is a served name is refused here
    except ValueError as exc:
        print(f"pdserve router: {exc}", file=sys.stderr)
        return 1

    import uvicorn

    from common.registry import redacted

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
