"""GGUF files of the llama, qwen2 and qwen3 architectures, written from tiny transformers models
the way llama.cpp's converter lays them out, load back to the same logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.attention.reference import TorchAttentionBackend
from common.gguf_file import open_gguf
from common.model_files import ModelSource
from common.models.config import ModelConfig
from common.models.layers import rope_inv_freq
from common.models.loader import load_model
from tests.tiny_llama import LLAMA3_ROPE_SCALING, TINY_HF_SHAPE

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def tiny_hf_model(config_cls, **overrides):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config_cls(**{**TINY_HF_SHAPE, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(
                1.0 + 0.2 * torch.randn_like(p)
                if name.endswith("norm.weight")
                else 0.15 * torch.randn_like(p)
            )
    return model.eval()


def head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def interleave_rotary_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's permutation of q/k rows for llama-architecture files."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(
    hf_model, path, arch: str, rope_freqs: np.ndarray | None = None, block_type=None
) -> ModelSource:
    """block_type (a GGMLQuantizationType): store every matrix in those blocks, as a quantized
    file does; None stores fp32."""
    cfg = hf_model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(head_dim(cfg))
    writer.add_value_length(head_dim(cfg))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_token_list([f"t{i}".encode() for i in range(cfg.vocab_size)])  # vocab size from here
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for name, tensor in hf_model.state_dict().items():
        w = tensor.float().numpy()
        if name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        elif name == "lm_head.weight":
            if cfg.tie_word_embeddings:
                continue
            gguf_name = "output.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            gguf_name = f"blk.{layer}.{LAYER_TENSORS[rest]}"
            if arch == "llama" and rest == "self_attn.q_proj.weight":
                w = interleave_rotary_rows(w, cfg.num_attention_heads)
            if arch == "llama" and rest == "self_attn.k_proj.weight":
                w = interleave_rotary_rows(w, cfg.num_key_value_heads)
        if block_type is not None and w.ndim == 2:
            writer.add_tensor(gguf_name, gguf.quants.quantize(w, block_type), raw_dtype=block_type)
        else:
            writer.add_tensor(gguf_name, np.ascontiguousarray(w))
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return ModelSource("gguf", path, "tiny")


CASES = {
    "llama-untied": ("llama", transformers.LlamaConfig, {}),
    "llama-tied": ("llama", transformers.LlamaConfig, dict(tie_word_embeddings=True)),
    "qwen2-tied": ("qwen2", transformers.Qwen2Config, dict(tie_word_embeddings=True)),
    "qwen3-head-dim-32": ("qwen3", transformers.Qwen3Config, dict(head_dim=32)),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_gguf_of_each_architecture_matches_transformers(case, tmp_path, paged_runner, logits_close):
    arch, config_cls, overrides = case
    hf_model = tiny_hf_model(config_cls, **overrides)
    source = write_gguf(hf_model, tmp_path / "tiny.gguf", arch)
    ours, config = load_model(source, dtype="auto", device="cpu", attn_backend=TorchAttentionBackend())
    assert config.architecture == type(hf_model).__name__
    assert config.vocab_size == 256 and config.head_dim == head_dim(hf_model.config)
    assert config.tie_word_embeddings == bool(overrides.get("tie_word_embeddings"))
    check_prefill_and_decode(ours, hf_model, paged_runner(ours), logits_close)


def test_gguf_rope_freqs_tensor_applies_llama3_scaling(tmp_path, paged_runner, logits_close):
    hf_model = tiny_hf_model(transformers.LlamaConfig, rope_scaling=LLAMA3_ROPE_SCALING)
    # llama.cpp bakes llama3 scaling into per-frequency divisors of the plain frequencies.
    dim, theta = head_dim(hf_model.config), TINY_HF_SHAPE["rope_theta"]
    divisors = rope_inv_freq(dim, theta, None) / rope_inv_freq(dim, theta, LLAMA3_ROPE_SCALING)
    assert not torch.allclose(divisors, torch.ones_like(divisors))
    source = write_gguf(hf_model, tmp_path / "tiny.gguf", "llama", rope_freqs=divisors.numpy())
    ours, config = load_model(source, dtype="auto", device="cpu", attn_backend=TorchAttentionBackend())
    assert config.rope_scaling["rope_type"] == "freq_factors"
    check_prefill_and_decode(ours, hf_model, paged_runner(ours), logits_close)


def test_gguf_of_unsupported_architecture_is_refused_by_name(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"GGUF architecture 'gpt2' is not supported.*llama.*qwen3"):
        ModelConfig.from_gguf(open_gguf(tmp_path / "gpt2.gguf"))


def check_prefill_and_decode(ours, hf_model, runner, logits_close) -> None:
    g = torch.Generator().manual_seed(2)
    seqs = {"a": torch.randint(0, 256, (19,), generator=g).tolist(), "b": [5, 6, 7]}
    out = runner.step(list(seqs.items()))
    for _ in range(3):
        for req, tokens in seqs.items():
            with torch.no_grad():
                ref = hf_model(torch.tensor([tokens])).logits[0]
            logits_close(out[req], ref[-len(out[req]) :])
            tokens.append(int(out[req][-1].argmax()))
        out = runner.step([(req, tokens[-1:]) for req, tokens in seqs.items()])
