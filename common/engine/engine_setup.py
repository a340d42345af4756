"""Setting an engine up: the device, the settings left to the model, the model, the cache size.

`set_up_engine` is the one path from an EngineConfig to what an engine (or a
tensor-parallel rank) runs on: it finds the model's files, fills every setting the
config leaves None from the model and the device (`resolve_engine_config`, checked
before any weight is read), loads the weights (a rank's shard with a tp_group) and
sizes the KV cache (kv_cache_sizing.py). LLMEngine.from_config (rank 0, after
`start_other_ranks` under tensor parallelism) and common/distributed/rank_worker.py (the
other ranks) both call it.

The defaults themselves live torch-free in common/config/engine_config.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from common.attention.backend_select import get_attention_backend
from common.config.context_length import resolve_max_model_len
from common.config.engine_config import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_MAX_NUM_BATCHED_TOKENS,
    DEFAULT_MAX_NUM_SEQS,
    MIN_UNCHUNKED_BATCHED_TOKENS,
    EngineConfig,
)
from common.distributed.shard_plan import plan_shards
from common.engine.kv_cache_sizing import kv_cache_num_blocks
from common.generation_config import read_generation_config
from common.model_files import ModelSource, resolve_model

if TYPE_CHECKING:
    from common.distributed.executor import TensorParallelExecutor


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available here; use --device cpu or auto")
    return torch.device(device)


def resolve_engine_config(config: EngineConfig, model_config, device: torch.device) -> EngineConfig:
    """A copy of `config` with every None filled from the model and the device, and checked.
    Resolving a resolved config again (on the same device) changes nothing."""
    plan_shards(model_config, config.tensor_parallel_size)  # ValueError when the model does not split so
    max_model_len = resolve_max_model_len(config.max_model_len, model_config.max_position_embeddings)
    chunked = True if config.enable_chunked_prefill is None else config.enable_chunked_prefill
    max_batched = config.max_num_batched_tokens
    if max_batched is None:
        if chunked:
            max_batched = DEFAULT_MAX_NUM_BATCHED_TOKENS.get(device.type, 2048)
        else:
            max_batched = max(max_model_len, MIN_UNCHUNKED_BATCHED_TOKENS)
    if max_batched < 1:
        raise ValueError(f"--max-num-batched-tokens must be at least 1, got {max_batched}")
    max_num_seqs = config.max_num_seqs
    if max_num_seqs is None:
        # every running sequence needs a token of the step's budget: a small budget given
        # alone (--max-num-batched-tokens 16) lowers the default rather than failing
        max_num_seqs = min(DEFAULT_MAX_NUM_SEQS, max_batched)
    return dataclasses.replace(
        config,
        device=str(device),
        max_model_len=max_model_len,
        block_size=config.block_size or DEFAULT_BLOCK_SIZE,
        enable_prefix_caching=True if config.enable_prefix_caching is None else config.enable_prefix_caching,
        enable_chunked_prefill=chunked,
        max_num_batched_tokens=max_batched,
        max_num_seqs=max_num_seqs,
    )


@dataclass
class EngineSetup:
    config: EngineConfig  # resolved: no None left for the model or the device to fill
    model: Any
    model_config: Any  # the whole model's config (a rank's own heads are in model.rank_config)
    num_blocks: int  # of this process's KV cache
    source: ModelSource | None  # where the weights came from; None for a passed model without --model

    def generation_config(self) -> dict[str, Any]:
        """The model's generation-config defaults (--generation-config)."""
        folder = self.source.path if self.source is not None and self.source.kind == "hf_dir" else None
        return read_generation_config(self.config.generation_config, folder)


def resolve_model_and_config(
    config: EngineConfig, device: torch.device, model_config=None
) -> tuple[EngineConfig, ModelSource | None, Any]:
    """(the resolved config, the model's files, the model config), reading no weight:
    the files are those of config.model (None when a model_config is passed and
    config.model is not set); the model config is `model_config` or read from them."""
    from common.models.config import load_model_config  # the model code loads when a model does

    source = None
    if model_config is None or config.model is not None:
        source = resolve_model(config.model, config.revision, config.download_dir)
    if model_config is None:
        model_config = load_model_config(source, config.hf_config_path)
    return resolve_engine_config(config, model_config, device), source, model_config


def set_up_engine(
    config: EngineConfig, device: torch.device, *, model=None, model_config=None, tp_group=None
) -> EngineSetup:
    """Resolve `config`, load the model (unless given; this rank's shard with `tp_group`,
    on every rank of it at once) and size the KV cache.

    A passed `model` keeps its own dtype and attention backend (--dtype is not applied);
    its config is `model_config`, else model.config."""
    from common.config.quantization import resolve_quantization
    from common.models.loader import load_model, source_load_format

    if model is None:
        model_config = None  # read from the files about to be loaded
    elif model_config is None:
        model_config = model.config
    torch.manual_seed(config.seed)
    config, source, model_config = resolve_model_and_config(config, device, model_config)
    if model is None:
        model, model_config = load_model(
            source,
            load_format=config.load_format,
            dtype=config.dtype,
            device=device,
            attn_backend=get_attention_backend(device, config.kv_cache_dtype, config.max_model_len),
            hf_config_path=config.hf_config_path,
            seed=config.seed,
            tp_group=tp_group,
            quantization=resolve_quantization(
                config.quantization,
                source_load_format(source, config.load_format),
                device.type,
                config.tensor_parallel_size,
                model_config.extra,  # config.json: its quantization_config, checked here
            ),
        )
    num_blocks = kv_cache_num_blocks(config, model, model_config, device, tp_group)
    return EngineSetup(config, model, model_config, num_blocks, source)


def start_other_ranks(
    config: EngineConfig, device: torch.device, model=None
) -> TensorParallelExecutor | None:
    """With --tensor-parallel-size N > 1, this process is rank 0: start ranks 1..N-1 with
    the resolved settings (checked before any of them starts); None for one rank."""
    if config.tensor_parallel_size <= 1:
        return None
    if model is not None:
        raise ValueError(
            f"--tensor-parallel-size {config.tensor_parallel_size} loads the model in every rank; "
            "pass a config with `model` set, not a loaded model"
        )
    from common.distributed.executor import TensorParallelExecutor  # zmq and subprocesses: only for N > 1

    config, _, _ = resolve_model_and_config(config, device)
    return TensorParallelExecutor(config, device)


def resolve_async_scheduling(config: EngineConfig, cuda_graphs: bool) -> bool:
    """--async-scheduling, by default on where decode steps replay CUDA graphs."""
    if config.tensor_parallel_size > 1:
        if config.async_scheduling:
            raise ValueError(
                "--async-scheduling does not run with --tensor-parallel-size > 1 yet; "
                "pass --no-async-scheduling or leave it unset"
            )
        return False
    if config.async_scheduling is None:
        return cuda_graphs
    return config.async_scheduling


def resolve_warmup(config: EngineConfig) -> bool:
    """--warmup, by default on where kernels compile on first use: on a GPU, not on CPU (a
    resolved config's device)."""
    if config.warmup is not None:
        return config.warmup
    return torch.device(config.device).type == "cuda"


def end_token_ids(model_config, generation_config: dict[str, Any]) -> tuple[int | None, list[int]]:
    """(EOS, the other ids that end a generation): the model's EOS first, then the
    generation config's eos_token_id list."""
    ids = list(model_config.eos_token_ids)
    extra = generation_config.get("eos_token_id")
    ids += [extra] if isinstance(extra, int) else list(extra or [])
    ids = list(dict.fromkeys(ids))
    if not ids:
        return None, []
    return ids[0], ids[1:]
