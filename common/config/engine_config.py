"""The engine's settings, named as vLLM's flags (dest names), with vLLM's defaults.

Filled from the command line by common/config/engine_args.py. `None` means "resolve
from the model or device" (common/engine/engine_setup.py resolve_engine_config), with
the defaults below: their one home, torch-free, so the router and the command line
read them without loading the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from common.config.kv_events_config import KVEventsConfig
from common.config.kv_transfer_config import KVTransferConfig
from common.config.lora_config import LoRAConfig
from common.config.structured_outputs_config import StructuredOutputsConfig

DEFAULT_BLOCK_SIZE = 16
DEFAULT_MAX_NUM_SEQS = 256
# Token budget per step with chunked prefill. vLLM's default is 2048 for serving (8192
# and up on large GPUs); a CPU step of 2048 tokens already takes seconds, so more would
# only delay the running decodes, while a GPU forward of 8192 tokens keeps it busy.
DEFAULT_MAX_NUM_BATCHED_TOKENS = {"cpu": 2048, "cuda": 8192}
# Without chunked prefill a whole prompt must fit in one step.
MIN_UNCHUNKED_BATCHED_TOKENS = 2048


@dataclass
class EngineConfig:
    # model
    model: str | None = None  # None: the embedded default model
    tokenizer: str | None = None
    revision: str | None = None
    tokenizer_revision: str | None = None
    served_model_name: list[str] | None = None
    load_format: str = "auto"  # auto | safetensors | gguf | dummy
    download_dir: str | None = None
    hf_config_path: str | None = None
    generation_config: str = "auto"  # auto | vllm | a folder
    override_generation_config: dict[str, Any] = field(default_factory=dict)
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16 (the flag's half/float become float16/float32)
    quantization: str | None = None  # None (the checkpoint's own: GGUF kept quantized on CPU) | gguf | none
    seed: int = 0
    max_model_len: int | None = None
    max_logprobs: int = 20
    chat_template: str | None = None
    # device and cache
    device: str = "auto"  # auto | cpu | cuda
    block_size: int | None = None  # None -> DEFAULT_BLOCK_SIZE
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: int | None = None
    num_gpu_blocks_override: int | None = None
    kv_cache_dtype: str = "auto"  # auto | fp8 | fp8_e4m3 | bfloat16 | float16 | float32
    enable_prefix_caching: bool | None = None  # None -> True
    prefix_caching_hash_algo: str = "sha256"  # sha256 | sha256_cbor | xxhash | xxhash_cbor
    # scheduler
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    enable_chunked_prefill: bool | None = None  # None -> True
    long_prefill_token_threshold: int = 0
    max_num_partial_prefills: int = 1
    max_long_partial_prefills: int = 1
    scheduling_policy: str = "fcfs"  # fcfs | priority
    async_scheduling: bool | None = None  # None -> on for CUDA graphs, off on CPU
    enforce_eager: bool = False
    warmup: bool | None = None  # None -> on with a GPU, off on CPU (common/engine/warmup.py)
    # parallelism and disaggregation
    tensor_parallel_size: int = 1
    kv_transfer_config: KVTransferConfig | None = None
    kv_events_config: KVEventsConfig | None = None
    disable_log_stats: bool = False
    # structured outputs: the grammar backend, JSON defaults, the reasoning parser
    structured_outputs_config: StructuredOutputsConfig = field(default_factory=StructuredOutputsConfig)
    # LoRA adapters: --enable-lora, --max-loras, --max-lora-rank, --max-cpu-loras, ...
    lora_config: LoRAConfig = field(default_factory=LoRAConfig)
