"""Tiny random Llamas for plumbing tests, in the three forms tests need: a ModelConfig
(tiny_config), a model with random weights far from greedy ties (tiny_llama, randomize),
and a checkpoint's config.json (tiny_hf_config). Fast on CPU; a test that needs another
shape passes only the fields that differ."""

from __future__ import annotations

import torch

from common.attention.backend_select import get_attention_backend
from common.models.config import ModelConfig
from common.models.llama import LlamaForCausalLM

# The shape of a tiny checkpoint on disk (config.json fields, also transformers' config kwargs).
TINY_HF_SHAPE = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
)


# Llama 3's RoPE scaling with a small original context, so the scaling changes most frequencies.
LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def tiny_hf_config(arch: str = "LlamaForCausalLM", **overrides) -> dict:
    """A config.json of a tiny checkpoint of `arch`; `overrides` replace or add fields."""
    return {"architectures": [arch], **TINY_HF_SHAPE, **overrides}


def tiny_config(**overrides) -> ModelConfig:
    """A tiny Llama ModelConfig, smaller than the checkpoint shape; `overrides` replace fields."""
    fields = {
        **TINY_HF_SHAPE,
        "architecture": "LlamaForCausalLM",
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "head_dim": 8,
        "rope_scaling": None,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
    }
    return ModelConfig(**{**fields, **overrides})


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Norm weights 1, every other weight N(0, 0.3) from `seed`: wide enough that greedy
    choices are far from ties, so runs that should agree do agree."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.3, generator=generator)
    return model


def tiny_llama(max_position_embeddings: int = 256, seed: int = 0) -> tuple[LlamaForCausalLM, ModelConfig]:
    config = tiny_config(max_position_embeddings=max_position_embeddings)
    model = LlamaForCausalLM(config, get_attention_backend("cpu"))
    return randomize(model, seed).eval(), config
