"""A tiny random Llama for plumbing tests: fast on CPU, greedy choices far from ties."""

from __future__ import annotations

import torch

from common.attention.backend_select import get_attention_backend
from common.models.config import ModelConfig
from common.models.llama import LlamaForCausalLM


def tiny_llama(max_position_embeddings: int = 256, seed: int = 0) -> tuple[LlamaForCausalLM, ModelConfig]:
    config = ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling=None,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config, get_attention_backend("cpu"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:  # wide enough that greedy choices are far from ties
                param.normal_(0.0, 0.3, generator=generator)
    return model.eval(), config
