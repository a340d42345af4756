"""Tiny random models of every supported architecture, saved by transformers as safetensors,
load through our loader and give transformers' logits (fp32, through the paged KV cache)."""

from __future__ import annotations

import pytest
import torch

from common.attention.reference import TorchAttentionBackend
from common.model_files import ModelSource
from common.models.loader import load_model
from tests.tiny_llama import LLAMA3_ROPE_SCALING, TINY_HF_SHAPE

transformers = pytest.importorskip("transformers")


CASES = {
    "llama3-rope-untied": (
        transformers.LlamaConfig,
        dict(rope_scaling=LLAMA3_ROPE_SCALING, rope_theta=500000.0),
    ),
    "llama-tied": (transformers.LlamaConfig, dict(tie_word_embeddings=True)),
    "llama-attention-bias": (transformers.LlamaConfig, dict(attention_bias=True)),
    "mistral": (transformers.MistralConfig, dict(sliding_window=None, rope_theta=1e6)),
    "qwen2-qkv-bias-tied": (transformers.Qwen2Config, dict(tie_word_embeddings=True)),
    "qwen3-qk-norm-head-dim-32": (transformers.Qwen3Config, dict(head_dim=32)),
}


def make_tiny_hf_model(config_cls, overrides: dict, seed: int = 0):
    """A random transformers model whose every weight (biases and norms too) is non-trivial."""
    config = config_cls(**{**TINY_HF_SHAPE, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    return model.eval()


def save(model, folder, **kwargs) -> ModelSource:
    model.save_pretrained(folder, **kwargs)
    return ModelSource("hf_dir", folder, "tiny")


def load(source: ModelSource):
    model, _ = load_model(source, dtype=torch.float32, device="cpu", attn_backend=TorchAttentionBackend())
    return model


def hf_logits(hf_model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([tokens])).logits[0].float()


def check_against_transformers(ours, hf_model, runner, logits_close) -> None:
    """Two requests packed in a prefill, then decode steps together, each step vs a full HF forward."""
    g = torch.Generator().manual_seed(1)
    seqs = {
        "a": torch.randint(0, 256, (23,), generator=g).tolist(),
        "b": torch.randint(0, 256, (6,), generator=g).tolist(),
    }
    out = runner.step(list(seqs.items()))
    for req, tokens in seqs.items():
        logits_close(out[req], hf_logits(hf_model, tokens))
    for _ in range(4):
        for req in seqs:
            seqs[req].append(int(out[req][-1].argmax()))
        out = runner.step([(req, tokens[-1:]) for req, tokens in seqs.items()])
        for req, tokens in seqs.items():
            logits_close(out[req], hf_logits(hf_model, tokens)[-1:])


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_tiny_model_matches_transformers(case, tmp_path, paged_runner, logits_close):
    config_cls, overrides = case
    hf_model = make_tiny_hf_model(config_cls, overrides)
    ours = load(save(hf_model, tmp_path))
    assert ours.config.architecture == type(hf_model).__name__
    assert (ours.lm_head is ours.embed_tokens) == bool(overrides.get("tie_word_embeddings"))
    check_against_transformers(ours, hf_model, paged_runner(ours), logits_close)


def test_sharded_checkpoint_loads_through_its_index(tmp_path, paged_runner, logits_close):
    hf_model = make_tiny_hf_model(transformers.Qwen3Config, dict(head_dim=32), seed=3)
    source = save(hf_model, tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 3
    ours = load(source)
    check_against_transformers(ours, hf_model, paged_runner(ours), logits_close)


def test_bfloat16_checkpoint_loads_in_float32_exactly(tmp_path, paged_runner, logits_close):
    source = save(make_tiny_hf_model(transformers.LlamaConfig, {}).to(torch.bfloat16), tmp_path)
    ours, config = load_model(source, dtype="auto", device="cpu", attn_backend=TorchAttentionBackend())
    assert config.torch_dtype == "bfloat16"
    assert next(ours.parameters()).dtype == torch.float32
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    check_against_transformers(ours, reference, paged_runner(ours), logits_close)
