"""The engine's command-line flags: vLLM's names, defaults, choices and help texts for the
flags of `vllm serve` that apply to a pdserve engine, plus pdserve's own --device.

    parser = PdserveArgumentParser(prog="pdserve run-batch")
    add_engine_args(parser)
    config = engine_config_from_args(parser.parse_args(argv))
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import fields
from typing import Any

from common.config.arg_parser import (
    JsonObjectAction,
    PdserveArgumentParser,
    RefusedFlagAction,
    add_config_file_arg,
)
from common.config.arg_types import any_int, choice, fraction, human_int, int_at_least
from common.config.engine_config import EngineConfig
from common.config.kv_events_config import KVEventsConfig
from common.config.kv_transfer_config import KNOWN_KV_CONNECTORS, KVTransferConfig
from common.config.lora_config import add_lora_args, lora_config_from_args
from common.config.quantization import add_quantization_arg
from common.config.shared_args import (
    JSON_HELP,
    SIZE_SUFFIXES_HELP,
    add_block_hashing_args,
    add_model_args,
)
from common.config.structured_outputs_config import (
    add_structured_outputs_args,
    structured_outputs_config_from_args,
)

DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
_DTYPE_ALIASES = {"half": "float16", "float": "float32"}
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
KV_CACHE_DTYPES = ("auto", "bfloat16", "float16", "float32", "fp8", "fp8_e4m3")
SCHEDULING_POLICIES = ("fcfs", "priority")
DEVICES = ("auto", "cpu", "cuda")

TRUST_REMOTE_CODE_REFUSAL = (
    "--trust-remote-code is not supported: pdserve never runs code from a model repository; "
    "it runs the architectures it implements itself (Llama, Mistral, Qwen2, Qwen3, SmolLM2), "
    "so drop the flag"
)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Add every engine flag to `parser`, which must be a PdserveArgumentParser (or one of
    its subcommand parsers): dotted JSON keys and --config are read there."""
    if not isinstance(parser, PdserveArgumentParser):
        raise TypeError(
            "add_engine_args needs a common.config.arg_parser.PdserveArgumentParser (or a "
            "subparser made by its add_subparsers()), which reads dotted JSON keys and --config"
        )
    _add_general_args(parser.add_argument_group("general"))
    _add_model_args(parser.add_argument_group("model"))
    _add_load_args(parser.add_argument_group("model loading"))
    _add_cache_args(parser.add_argument_group("KV cache"))
    _add_scheduler_args(parser.add_argument_group("scheduler"))
    _add_parallel_args(parser.add_argument_group("parallelism and disaggregation"))
    add_structured_outputs_args(parser.add_argument_group("structured outputs"))  # the router takes them too
    add_lora_args(parser.add_argument_group("LoRA adapters"))  # the router takes them too
    parser.add_namespace_check(_check_partial_prefills)
    parser.add_namespace_check(lora_config_from_args)  # --max-cpu-loras below --max-loras, ...


def engine_config_from_args(ns: argparse.Namespace) -> EngineConfig:
    """The EngineConfig of parsed flags (fields the namespace lacks or leaves None keep their
    defaults: --prefix-caching-hash-algo is None unless given, since the router reads None as
    "what the workers report")."""
    values: dict[str, Any] = {}
    for f in fields(EngineConfig):
        value = getattr(ns, f.name, None)
        if value is not None:  # a flag left unset keeps the engine's default
            values[f.name] = copy.deepcopy(value) if isinstance(value, dict | list) else value
    if "dtype" in values:
        values["dtype"] = _DTYPE_ALIASES.get(values["dtype"], values["dtype"])
    if isinstance(values.get("kv_transfer_config"), dict):
        values["kv_transfer_config"] = KVTransferConfig.from_dict(values["kv_transfer_config"])
    if isinstance(values.get("kv_events_config"), dict):
        values["kv_events_config"] = KVEventsConfig.from_dict(values["kv_events_config"])
    values["structured_outputs_config"] = structured_outputs_config_from_args(ns)
    values["lora_config"] = lora_config_from_args(ns)
    return EngineConfig(**values)


def _add_general_args(group: Any) -> None:
    add_config_file_arg(group)
    group.add_argument("--disable-log-stats", action="store_true", help="Disable logging statistics.")
    group.add_argument(
        "--device",
        type=choice(DEVICES),
        choices=DEVICES,
        default="auto",
        help='Device to run the engine on. "auto" picks cuda when a GPU is present, else cpu.',
    )


def _add_model_args(group: Any) -> None:
    add_model_args(group)  # the flags the router takes too
    group.add_argument(
        "--trust-remote-code",
        action=RefusedFlagAction,
        refusal=TRUST_REMOTE_CODE_REFUSAL,
        help="Not supported, and refused when given: pdserve never runs code from a model repository "
        "(vLLM: trust remote code, e.g. from Hugging Face, when downloading the model and "
        "tokenizer). --no-trust-remote-code is accepted.",
    )
    group.add_argument(
        "--dtype",
        type=choice(DTYPES),
        choices=DTYPES,
        default="auto",
        help='Data type for model weights and activations. "auto" will use FP16 precision for FP32 '
        'and FP16 models, and BF16 precision for BF16 models. "half" for FP16. "float16" is the '
        'same as "half". "bfloat16" for a balance between precision and range. "float" is '
        'shorthand for FP32 precision. "float32" for FP32 precision.',
    )
    add_quantization_arg(group)
    group.add_argument("--seed", type=any_int, default=0, help="Random seed for reproducibility.")
    group.add_argument(
        "--tokenizer-revision",
        default=None,
        help="The specific revision to use for the tokenizer on the Hugging Face Hub. It can be a "
        "branch name, a tag name, or a commit id. If unspecified, will use the default version.",
    )
    group.add_argument(
        "--enforce-eager",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Whether to always use eager-mode PyTorch. If True, we will disable CUDA graph and "
        "always execute the model in eager mode. If False, we will use CUDA graph and eager "
        "execution in hybrid for maximal performance and flexibility.",
    )
    group.add_argument(
        "--warmup",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Before the worker reports ready, run one step of every shape serving schedules "
        "(prefill token counts up to --max-num-batched-tokens, mixed prefill and decode steps, "
        "decode batch sizes, every sampling path), so that no request waits for Triton to compile "
        "a kernel. Compiled kernels are kept in $TRITON_CACHE_DIR (Triton's default: "
        "~/.triton/cache): a restart with the same folder loads them instead. Default: on with a "
        "GPU, off on CPU (nothing compiles there). --enforce-eager does not turn it off.",
    )


def _add_load_args(group: Any) -> None:
    group.add_argument(
        "--load-format",
        type=choice(LOAD_FORMATS),
        choices=LOAD_FORMATS,
        default="auto",
        help='The format of the model weights to load. "auto" loads the weights in the safetensors '
        'format from a folder, or from the GGUF file when --model is one. "safetensors" loads the '
        'weights in the safetensors format. "gguf" loads the weights from a GGUF format file '
        '(dequantized at load). "dummy" initializes the weights with random values, which is '
        "mainly for profiling.",
    )


def _add_cache_args(group: Any) -> None:
    add_block_hashing_args(group)  # the router hashes prompts as the workers do
    group.add_argument(
        "--gpu-memory-utilization",
        type=fraction,
        default=0.9,
        help="The fraction of GPU memory to be used for the model executor, which can range from 0 "
        "to 1. For example, a value of 0.5 would imply 50%% GPU memory utilization. If "
        "unspecified, will use the default value of 0.9. This is a per-instance limit, and only "
        "applies to the current instance. It does not matter if you have another instance running "
        "on the same GPU. For example, if you have two instances running on the same GPU, you can "
        "set the GPU memory utilization to 0.5 for each instance.",
    )
    group.add_argument(
        "--kv-cache-memory-bytes",
        type=human_int(minimum=1),
        default=None,
        help="Size of KV Cache per GPU in bytes. By default, this is set to None and the engine "
        "infers the KV cache size from gpu_memory_utilization. However, users may want to manually "
        "specify the KV cache memory size. kv_cache_memory_bytes allows more fine-grain control of "
        "how much memory gets used when compared with using gpu_memory_utilization. Note that "
        f"kv_cache_memory_bytes (when not-None) ignores gpu_memory_utilization. {SIZE_SUFFIXES_HELP}",
    )
    group.add_argument(
        "--kv-cache-dtype",
        type=choice(KV_CACHE_DTYPES),
        choices=KV_CACHE_DTYPES,
        default="auto",
        help='Data type for kv cache storage. If "auto", will use model data type. fp8 is the same '
        "as fp8_e4m3.",
    )
    group.add_argument(
        "--num-gpu-blocks-override",
        type=int_at_least(1),
        default=None,
        help="Number of GPU blocks to use. This overrides the profiled num_gpu_blocks if specified. "
        "Does nothing if None. Used for testing preemption.",
    )
    group.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Whether to enable prefix caching. Enabled by default.",
    )


def _add_scheduler_args(group: Any) -> None:
    group.add_argument(
        "--max-num-batched-tokens",
        type=human_int(minimum=1),
        default=None,
        help="Maximum number of tokens to be processed in a single iteration. This config has no "
        "static default. If left unspecified by the user, it will be set based on the usage "
        f"context. {SIZE_SUFFIXES_HELP}",
    )
    group.add_argument(
        "--max-num-seqs",
        type=int_at_least(1),
        default=None,
        help="Maximum number of sequences to be processed in a single iteration. This config has no "
        "static default. If left unspecified by the user, it will be set based on the usage "
        "context.",
    )
    group.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Schedule and launch the next decode step before the current step's tokens are read "
        "back, so the host's work (outputs, scheduling, input packing) overlaps the GPU's. The "
        "next step's input tokens go from the GPU's sampled tokens straight to its inputs; a "
        "request that stops wastes one step. Steps that admit or prefill requests, and requests "
        "with penalties, min_tokens, a seed or logprobs, still run one at a time. Default: on "
        "where decode steps replay CUDA graphs, off on CPU (no overlap to gain there).",
    )
    group.add_argument(
        "--max-num-partial-prefills",
        type=int_at_least(1),
        default=1,
        help="For chunked prefill, the maximum number of sequences that can be partially "
        "prefilled concurrently.",
    )
    group.add_argument(
        "--max-long-partial-prefills",
        type=int_at_least(1),
        default=1,
        help="For chunked prefill, the maximum number of prompts longer than "
        "long_prefill_token_threshold that will be prefilled concurrently. Setting this less than "
        "max_num_partial_prefills will allow shorter prompts to jump the queue in front of longer "
        "prompts in some cases, improving latency.",
    )
    group.add_argument(
        "--long-prefill-token-threshold",
        type=int_at_least(0),
        default=0,
        help="For chunked prefill, a request is considered long if the prompt is longer than this "
        "number of tokens.",
    )
    group.add_argument(
        "--scheduling-policy",
        type=choice(SCHEDULING_POLICIES),
        choices=SCHEDULING_POLICIES,
        default="fcfs",
        help='The scheduling policy to use. "fcfs" means first come first served, i.e. requests are '
        'handled in order of arrival. "priority" means requests are handled based on given '
        "priority (lower value means earlier handling) and time of arrival deciding any ties.",
    )
    group.add_argument(
        "--enable-chunked-prefill",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="If True, prefill requests can be chunked based on the remaining max_num_batched_tokens.",
    )


def _add_parallel_args(group: Any) -> None:
    group.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=int_at_least(1),
        default=1,
        help="Number of tensor parallel groups.",
    )
    group.add_argument(
        "--kv-transfer-config",
        action=JsonObjectAction,
        from_dict=KVTransferConfig.from_dict,
        default=None,
        help="The configurations for distributed KV cache transfer: kv_connector "
        f"({', '.join(KNOWN_KV_CONNECTORS)}), kv_role (kv_producer, kv_consumer, kv_both), "
        "engine_id, kv_buffer_device, kv_ip, kv_port, kv_connector_extra_config, "
        "kv_connector_module_path, kv_load_failure_policy (fail, recompute), ... "
        + JSON_HELP.format(flag="kv-transfer-config"),
    )
    group.add_argument(
        "--kv-events-config",
        action=JsonObjectAction,
        from_dict=KVEventsConfig.from_dict,
        default=None,
        help="The configurations for event publishing: enable_kv_cache_events, publisher (zmq, "
        "null), endpoint, replay_endpoint, buffer_steps, hwm, max_queue_size, topic. "
        + JSON_HELP.format(flag="kv-events-config"),
    )


def _check_partial_prefills(ns: argparse.Namespace) -> None:
    if ns.max_long_partial_prefills > ns.max_num_partial_prefills:
        raise ValueError(
            f"argument --max-long-partial-prefills: {ns.max_long_partial_prefills} is more than "
            f"--max-num-partial-prefills {ns.max_num_partial_prefills}; it must be at most that"
        )
    if ns.max_num_partial_prefills > 1 and ns.enable_chunked_prefill is False:
        raise ValueError(
            "argument --max-num-partial-prefills: more than 1 needs chunked prefill; "
            "drop --no-enable-chunked-prefill or set --max-num-partial-prefills 1"
        )
