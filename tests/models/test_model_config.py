"""ModelConfig from config.json (both transformers spellings) and from GGUF metadata."""

from __future__ import annotations

import json

import pytest

from common.models.config import ModelConfig, load_model_config, read_hf_config
from common.models.configs import bundled_config
from tests.harness.torch_free import assert_imports_without_torch
from tests.tiny_llama import tiny_hf_config


def test_bundled_llama_3_8b_config_has_the_public_architecture():
    cfg = ModelConfig.from_hf_config(read_hf_config(bundled_config("llama-3-8b")))
    assert cfg.architecture == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (32, 4096, 14336)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (32, 8, 128)
    assert (cfg.vocab_size, cfg.rope_theta, cfg.max_position_embeddings) == (128256, 500000.0, 8192)
    assert (cfg.rms_norm_eps, cfg.torch_dtype, cfg.tie_word_embeddings) == (1e-5, "bfloat16", False)
    assert cfg.rope_scaling is None


def test_unsupported_architecture_is_named_with_the_supported_list():
    with pytest.raises(
        ValueError, match=r"GPT2LMHeadModel is not supported.*LlamaForCausalLM.*Qwen3ForCausalLM"
    ):
        ModelConfig.from_hf_config(tiny_hf_config("GPT2LMHeadModel"))


def test_unsupported_architecture_in_a_folder_is_refused_before_loading(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_hf_config("PhiForCausalLM")))
    source = type("Source", (), {"kind": "hf_dir", "path": tmp_path})()
    with pytest.raises(ValueError, match="PhiForCausalLM is not supported"):
        load_model_config(source)


def test_missing_size_key_is_named():
    cfg = tiny_hf_config()
    del cfg["intermediate_size"]
    with pytest.raises(ValueError, match="no 'intermediate_size'"):
        ModelConfig.from_hf_config(cfg)


def test_legacy_rope_scaling_and_torch_dtype_keys_are_read():
    params = {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    raw = tiny_hf_config(rope_theta=5e5, rope_scaling={"type": "llama3", **params}, torch_dtype="bfloat16")
    cfg = ModelConfig.from_hf_config(raw)
    assert cfg.rope_theta == 5e5
    assert cfg.rope_scaling == {"rope_type": "llama3", **params}
    assert cfg.torch_dtype == "bfloat16"


def test_transformers_5_rope_parameters_and_dtype_keys_are_read():
    raw = tiny_hf_config(dtype="float16", rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    del raw["rope_theta"]
    cfg = ModelConfig.from_hf_config(raw)
    assert (cfg.rope_theta, cfg.rope_scaling, cfg.torch_dtype) == (1e6, None, "float16")


def test_unsupported_rope_scaling_is_refused_by_name():
    with pytest.raises(ValueError, match="RoPE scaling 'yarn' is not supported"):
        ModelConfig.from_hf_config(tiny_hf_config(rope_scaling={"rope_type": "yarn", "factor": 4.0}))


def test_non_silu_activation_is_refused():
    with pytest.raises(ValueError, match="hidden_act 'gelu'"):
        ModelConfig.from_hf_config(tiny_hf_config(hidden_act="gelu"))


def test_mistral_sliding_window_caps_the_context():
    cfg = ModelConfig.from_hf_config(tiny_hf_config("MistralForCausalLM", sliding_window=32))
    assert (cfg.sliding_window, cfg.max_position_embeddings) == (32, 32)
    cfg = ModelConfig.from_hf_config(tiny_hf_config("MistralForCausalLM", sliding_window=None))
    assert (cfg.sliding_window, cfg.max_position_embeddings) == (None, 128)


def test_qwen_sliding_window_counts_only_when_enabled():
    off = tiny_hf_config("Qwen2ForCausalLM", sliding_window=32, use_sliding_window=False)
    assert ModelConfig.from_hf_config(off).max_position_embeddings == 128
    on = tiny_hf_config("Qwen2ForCausalLM", sliding_window=32, use_sliding_window=True)
    assert ModelConfig.from_hf_config(on).max_position_embeddings == 32


def test_family_flags():
    qwen2 = ModelConfig.from_hf_config(tiny_hf_config("Qwen2ForCausalLM"))
    assert (qwen2.attention_bias, qwen2.attention_out_bias, qwen2.qk_norm) == (True, False, False)
    qwen3 = ModelConfig.from_hf_config(tiny_hf_config("Qwen3ForCausalLM", head_dim=32, attention_bias=False))
    assert (qwen3.attention_bias, qwen3.qk_norm, qwen3.head_dim) == (False, True, 32)
    llama = ModelConfig.from_hf_config(tiny_hf_config(attention_bias=True, eos_token_id=[7, 9]))
    assert (llama.attention_bias, llama.attention_out_bias, llama.head_dim) == (True, True, 16)
    assert llama.eos_token_ids == [7, 9]


def test_gguf_config_and_module_import_leave_torch_unloaded(smollm2_source):
    assert_imports_without_torch(
        "common.model_files",
        "common.models.config",
        then="""
            cfg = common.models.config.load_model_config(common.model_files.embedded_default_model())
            assert cfg.num_hidden_layers == 30 and cfg.vocab_size == 49152, cfg
        """,
    )


def test_architecture_falls_back_to_model_type():
    raw = tiny_hf_config(model_type="qwen3")
    del raw["architectures"]
    assert ModelConfig.from_hf_config(raw).architecture == "Qwen3ForCausalLM"
