"""load_model's formats, dtypes and errors; dummy weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.attention.reference import TorchAttentionBackend
from common.model_files import ModelSource
from common.models.loader import load_model, resolve_dtype
from tests.tiny_llama import tiny_hf_config

TINY_CONFIG = tiny_hf_config(tie_word_embeddings=False, torch_dtype="bfloat16")


def load(source, **kwargs):
    kwargs = {"dtype": torch.float32, "device": "cpu", **kwargs}
    return load_model(source, attn_backend=TorchAttentionBackend(), **kwargs)


@pytest.fixture
def tiny_folder(tmp_path) -> ModelSource:
    """A complete tiny checkpoint: config.json plus one safetensors file."""
    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIG))
    model, _ = load(ModelSource("hf_dir", tmp_path, "tiny"), load_format="dummy", seed=5)
    tensors = {name: t.clone().contiguous() for name, t in model.weight_targets().items()}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return ModelSource("hf_dir", tmp_path, "tiny")


def dummy_params(source, **kwargs) -> dict[str, torch.Tensor]:
    model, _ = load(source, load_format="dummy", **kwargs)
    return dict(model.named_parameters())


def test_dummy_weights_are_deterministic_per_seed(tiny_folder):
    a, b, c = (
        dummy_params(tiny_folder, seed=0),
        dummy_params(tiny_folder, seed=0),
        dummy_params(tiny_folder, seed=1),
    )
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["layers.0.self_attn.qkv_proj.weight"], c["layers.0.self_attn.qkv_proj.weight"])


def test_dummy_weights_fill_every_parameter_at_real_shapes(tiny_folder):
    params = dummy_params(tiny_folder, seed=0)
    assert params["layers.1.mlp.gate_up_proj.weight"].shape == (2 * 96, 64)
    assert params["layers.1.self_attn.qkv_proj.weight"].shape == ((4 + 2 + 2) * 16, 64)
    assert params["lm_head"].shape == (256, 64)
    for name, p in params.items():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            assert 0.01 < float(p.std()) < 0.03 and abs(float(p.mean())) < 0.01, name


def test_dummy_model_in_bfloat16_runs_a_forward(tiny_folder, paged_runner):
    model, _ = load(tiny_folder, load_format="dummy", dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    logits = paged_runner(model).step([("a", [1, 2, 3, 4, 5]), ("b", [9])])
    assert logits["a"].shape == (5, 256) and logits["a"].dtype == torch.float32
    assert torch.isfinite(logits["a"]).all() and torch.isfinite(logits["b"]).all()


def test_dummy_weights_from_hf_config_path_for_a_gguf_source(smollm2_source, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**TINY_CONFIG, "tie_word_embeddings": True}))
    model, config = load(smollm2_source, load_format="dummy", hf_config_path=str(tmp_path / "config.json"))
    assert (config.hidden_size, config.num_hidden_layers) == (64, 2)
    assert model.lm_head is model.embed_tokens


def test_safetensors_folder_round_trips(tiny_folder):
    model, config = load(tiny_folder)
    reference = load_file(str(tiny_folder.path / "model.safetensors"))
    targets = model.weight_targets()
    assert set(targets) == set(reference)
    assert all(torch.equal(targets[n], reference[n]) for n in reference)
    assert config.torch_dtype == "bfloat16"


def rewrite_checkpoint(source: ModelSource, edit) -> None:
    path = str(source.path / "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_missing_tensor_is_named(tiny_folder):
    rewrite_checkpoint(tiny_folder, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(ValueError, match=r"missing 1 tensor\(s\): model\.layers\.1\.mlp\.down_proj\.weight"):
        load(tiny_folder)


def test_unexpected_tensor_is_named(tiny_folder):
    rewrite_checkpoint(tiny_folder, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected 1 tensor\(s\): model\.layers\.0\.mlp\.extra\.weight"):
        load(tiny_folder)


def test_tensor_of_the_wrong_shape_is_named(tiny_folder):
    config = {**TINY_CONFIG, "intermediate_size": 128}
    (tiny_folder.path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"mlp\.(gate|up|down)_proj\.weight has shape .* needs"):
        load(tiny_folder)


def test_folder_without_safetensors_says_what_is_loadable(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIG))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load(ModelSource("hf_dir", tmp_path, "tiny"))


def test_load_format_must_fit_the_source(tiny_folder, smollm2_source):
    with pytest.raises(ValueError, match="--load-format 'pt' is not one of auto, safetensors, gguf, dummy"):
        load(tiny_folder, load_format="pt")
    with pytest.raises(ValueError, match="--load-format gguf needs a .gguf file"):
        load(tiny_folder, load_format="gguf")
    with pytest.raises(ValueError, match="--load-format safetensors needs a model folder"):
        load(smollm2_source, load_format="safetensors")


@pytest.mark.parametrize(
    "config_dtype, requested, device, expected",
    [
        ("bfloat16", "auto", "cpu", torch.float32),
        ("float32", "auto", "cpu", torch.float32),
        ("bfloat16", "auto", "cuda", torch.bfloat16),
        ("float16", "auto", "cuda", torch.float16),
        ("float32", "auto", "cuda", torch.float16),
        ("float32", "bfloat16", "cpu", torch.bfloat16),
        ("bfloat16", "half", "cpu", torch.float16),
        ("bfloat16", "float", "cuda", torch.float32),
    ],
)
def test_resolve_dtype(config_dtype, requested, device, expected):
    assert resolve_dtype(config_dtype, requested, device) == expected


def test_resolve_dtype_rejects_unknown_names():
    with pytest.raises(ValueError, match="--dtype 'int8' is not one of auto, float32"):
        resolve_dtype("float32", "int8", "cpu")
