"""How many KV blocks an engine gets, and the refusal when one max-length request would not fit."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from common.engine.kv_cache_sizing import (
    CPU_KV_CACHE_SPACE_BYTES,
    determine_num_blocks,
    kv_cache_bytes_per_block,
    profile_forward,
)
from tests.tiny_llama import tiny_llama

# SmolLM2-135M's KV shape: 30 layers, 3 KV heads of 64
SMOLLM2 = SimpleNamespace(num_hidden_layers=30, num_key_value_heads=3, head_dim=64)
CPU = torch.device("cpu")


def blocks(**kwargs) -> int:
    settings = dict(
        model_config=SMOLLM2,
        block_size=16,
        kv_cache_dtype=torch.float32,
        device=CPU,
        max_model_len=1024,
        max_num_seqs=256,
    )
    settings.update(kwargs)
    return determine_num_blocks(**settings)


def test_a_block_holds_k_and_v_of_every_layer():
    assert kv_cache_bytes_per_block(SMOLLM2, 16, torch.float32) == 30 * 2 * 3 * 16 * 64 * 4
    assert kv_cache_bytes_per_block(SMOLLM2, 16, torch.bfloat16) == 30 * 2 * 3 * 16 * 64 * 2
    assert kv_cache_bytes_per_block(SMOLLM2, 32, torch.float8_e4m3fn) == 30 * 2 * 3 * 32 * 64


def test_the_override_wins_over_everything():
    assert blocks(num_gpu_blocks_override=70, kv_cache_memory_bytes=10**9) == 70


def test_memory_bytes_are_divided_by_the_block_size():
    per_block = kv_cache_bytes_per_block(SMOLLM2, 16, torch.float32)
    assert blocks(kv_cache_memory_bytes=100 * per_block + per_block // 2) == 100


def test_cpu_default_is_the_fixed_kv_space():
    per_block = kv_cache_bytes_per_block(SMOLLM2, 16, torch.float32)
    assert blocks() == CPU_KV_CACHE_SPACE_BYTES // per_block


def test_cpu_default_stops_at_what_the_sequences_can_fill():
    # 4 sequences of 1024 tokens: 64 blocks each, plus the null block
    assert blocks(max_num_seqs=4) == 4 * 64 + 1


def test_a_cache_smaller_than_one_max_length_request_is_refused():
    with pytest.raises(ValueError) as excinfo:
        blocks(num_gpu_blocks_override=64)  # 63 usable blocks, 1024 tokens need 64
    message = str(excinfo.value)
    assert "--max-model-len 1024" in message and "--kv-cache-memory-bytes" in message
    assert blocks(num_gpu_blocks_override=65) == 65


def test_profile_forward_runs_the_largest_step():
    model, config = tiny_llama(max_position_embeddings=128)
    # 40 tokens at a max length of 16: requests of 16, 16 and 8 tokens, 5 sampling rows
    profile_forward(
        model,
        config,
        num_tokens=40,
        max_model_len=16,
        max_num_seqs=5,
        block_size=4,
        kv_cache_dtype="auto",
        device="cpu",
        dtype=torch.float32,
    )
