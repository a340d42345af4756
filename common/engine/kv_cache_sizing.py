"""How many KV-cache blocks an engine gets.

In order of precedence, as vLLM decides it:
  1. --num-gpu-blocks-override, taken as given;
  2. --kv-cache-memory-bytes, divided by the size of one block;
  3. on CUDA, --gpu-memory-utilization: the device's total memory times the fraction,
     less what the weights, a profiling forward of --max-num-batched-tokens tokens and
     everything outside torch already use;
  4. on CPU, a fixed KV space (CPU_KV_CACHE_SPACE_BYTES, vLLM's CPU default of 4 GiB),
     no more than --max-num-seqs requests of --max-model-len tokens can fill.
In every case the cache must hold at least one request of --max-model-len tokens.
The count includes block 0, the null block the block pool never hands out.

kv_cache_num_blocks applies this to a resolved EngineConfig and a loaded model: the
profiling forward (profile_forward) and, under tensor parallelism, the ranks agreeing
on one count.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from common.config.engine_config import EngineConfig
from common.engine.kv_cache_tensor import cache_model_config, resolve_kv_cache_dtype
from common.engine.model_runner import ModelRunner
from common.engine.request import Request
from common.engine.scheduled_batch import ScheduledBatch
from common.sampling_params import SamplingParams

CPU_KV_CACHE_SPACE_BYTES = 4 * 2**30


def kv_cache_bytes_per_block(model_config, block_size: int, kv_cache_dtype: torch.dtype) -> int:
    """Bytes of one block across all layers, K and V (one contiguous region of the cache)."""
    elements = (
        model_config.num_hidden_layers
        * 2
        * model_config.num_key_value_heads
        * block_size
        * model_config.head_dim
    )
    return elements * torch.empty((), dtype=kv_cache_dtype).element_size()


def blocks_for_tokens(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def determine_num_blocks(
    *,
    model_config,
    block_size: int,
    kv_cache_dtype: torch.dtype,
    device: torch.device,
    max_model_len: int,
    max_num_seqs: int,
    num_gpu_blocks_override: int | None = None,
    kv_cache_memory_bytes: int | None = None,
    gpu_memory_utilization: float = 0.9,
    profile_forward: Callable[[], None] | None = None,
) -> int:
    """The number of blocks, or ValueError when they cannot hold one max-length request.

    `profile_forward` runs the model once at its largest step (CUDA only); the memory
    it peaks at is kept free for activations.
    """
    bytes_per_block = kv_cache_bytes_per_block(model_config, block_size, kv_cache_dtype)
    if num_gpu_blocks_override is not None:
        num_blocks, source = num_gpu_blocks_override, f"--num-gpu-blocks-override {num_gpu_blocks_override}"
    elif kv_cache_memory_bytes is not None:
        num_blocks = kv_cache_memory_bytes // bytes_per_block
        source = f"--kv-cache-memory-bytes {kv_cache_memory_bytes}"
    elif device.type == "cuda":
        available = _cuda_kv_cache_bytes(device, gpu_memory_utilization, profile_forward)
        num_blocks = max(available, 0) // bytes_per_block
        source = f"--gpu-memory-utilization {gpu_memory_utilization} ({max(available, 0) / 2**30:.2f} GiB left for the KV cache)"
    else:
        enough = max_num_seqs * blocks_for_tokens(max_model_len, block_size) + 1
        num_blocks = min(CPU_KV_CACHE_SPACE_BYTES // bytes_per_block, enough)
        source = f"the CPU KV space of {CPU_KV_CACHE_SPACE_BYTES / 2**30:g} GiB"

    needed = blocks_for_tokens(max_model_len, block_size)
    usable = num_blocks - 1  # block 0 is the null block
    if usable < needed:
        raise ValueError(
            f"the KV cache from {source} holds {max(usable, 0)} usable blocks of {block_size} tokens "
            f"({max(usable, 0) * block_size} tokens), fewer than one request of --max-model-len "
            f"{max_model_len} needs ({needed} blocks, {needed * bytes_per_block} bytes); "
            "lower --max-model-len, or give the cache more room with --kv-cache-memory-bytes "
            "(or --gpu-memory-utilization / --num-gpu-blocks-override)"
        )
    return num_blocks


def _cuda_kv_cache_bytes(
    device: torch.device, gpu_memory_utilization: float, profile_forward: Callable[[], None] | None
) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    if profile_forward is not None:
        profile_forward()
        torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    torch_peak = torch.cuda.max_memory_allocated(device)
    # memory held outside torch's allocator (CUDA context, NCCL, other processes)
    non_torch = (total - free) - torch.cuda.memory_reserved(device)
    return int(total * gpu_memory_utilization) - torch_peak - non_torch


def kv_cache_num_blocks(
    config: EngineConfig, model, model_config, device: torch.device, tp_group=None
) -> int:
    """Blocks of the KV cache for a resolved config (determine_num_blocks decides). Every
    rank of `tp_group` calls it at once, sizing its own cache (its own KV heads, on CUDA its
    own profiling forward, run in step by all ranks); they agree on the smallest count."""
    dtype = next(model.parameters()).dtype
    kv_cache_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, dtype)

    def profile() -> None:
        profile_forward(
            model,
            model_config,
            num_tokens=config.max_num_batched_tokens,
            max_model_len=config.max_model_len,
            max_num_seqs=config.max_num_seqs,
            block_size=config.block_size,
            kv_cache_dtype=kv_cache_dtype,
            device=device,
            dtype=dtype,
        )

    def determine() -> int:
        return determine_num_blocks(
            model_config=cache_model_config(model, model_config),
            block_size=config.block_size,
            kv_cache_dtype=kv_cache_dtype,
            device=device,
            max_model_len=config.max_model_len,
            max_num_seqs=config.max_num_seqs,
            num_gpu_blocks_override=config.num_gpu_blocks_override,
            kv_cache_memory_bytes=config.kv_cache_memory_bytes,
            gpu_memory_utilization=config.gpu_memory_utilization,
            profile_forward=profile,
        )

    if tp_group is None:
        return determine()
    error = None
    try:
        num_blocks = determine()
    except ValueError as e:  # still join the agreement, or the other ranks would wait forever
        num_blocks, error = 0, e
    agreed = tp_group.min_int(num_blocks)
    if agreed == 0:
        if error is not None:
            raise error
        raise ValueError(
            "another tensor-parallel rank has no room for the KV cache (its error is in its output); "
            "lower --max-model-len or give the cache more room"
        )
    return agreed


def profile_forward(
    model,
    model_config,
    *,
    num_tokens: int,
    max_model_len: int,
    max_num_seqs: int,
    block_size: int,
    kv_cache_dtype: str | torch.dtype,
    device: torch.device | str,
    dtype: torch.dtype,
) -> None:
    """One step at the largest size the scheduler may build, on a throwaway cache.

    The prompts are split at --max-model-len, and logits are computed for
    --max-num-seqs rows, so the activation peak is the one serving can reach.
    """
    lengths = [max_model_len] * (num_tokens // max_model_len)
    if num_tokens % max_model_len:
        lengths.append(num_tokens % max_model_len)
    tables, next_block = [], 0
    for length in lengths:
        n = -(-length // block_size)
        tables.append(list(range(next_block, next_block + n)))
        next_block += n
    runner = ModelRunner(
        model,
        model_config,
        num_blocks=next_block,
        block_size=block_size,
        kv_cache_dtype=kv_cache_dtype,
        device=device,
        dtype=dtype,
        max_model_len=max_model_len,
        enforce_eager=True,
    )
    requests = [
        Request(f"profile-{i}", [0] * length, SamplingParams(temperature=0.0))
        for i, length in enumerate(lengths)
    ]
    with torch.inference_mode():
        inputs = runner.prepare_inputs(ScheduledBatch(requests, lengths, tables))
        hidden = model(inputs.input_ids, inputs.positions, runner.kv_cache, inputs.attn_metadata)
        rows = torch.zeros(max_num_seqs, dtype=torch.int64, device=hidden.device)
        logits = model.compute_logits(hidden[rows])
        if logits is not None:  # None on tensor-parallel ranks other than 0
            runner.sampler(logits, [requests[0]] * max_num_seqs)
    del runner, hidden, logits
