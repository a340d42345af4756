"""Reading PEFT adapter folders: what is refused, with what message, and that a refusal
leaves nothing loaded. The adapters are written here with safetensors in PEFT's layout."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from common.lora.adapter_cache import AdapterCache
from common.lora.lora_request import LoRARequest
from common.lora.peft_adapter import LoRAError, load_peft_adapter, module_shapes
from tests.tiny_llama import tiny_llama


@pytest.fixture(scope="module")
def model_config():
    return tiny_llama()[1]


def write_adapter(
    folder,
    model_config,
    *,
    r=4,
    alpha=8,
    targets=("q_proj", "v_proj"),
    config_extra=None,
    tensors=None,
    std=1.0,
):
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": list(targets),
        "bias": "none",
    }
    config.update(config_extra or {})
    (folder / "adapter_config.json").write_text(json.dumps(config))
    if tensors is None:
        shapes = module_shapes(model_config)
        tensors = {}
        for layer in range(model_config.num_hidden_layers):
            for module in targets:
                block = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
                in_f, out_f = shapes[module]
                tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, in_f) * std
                tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_f, r) * std
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def test_a_good_adapter_loads_with_its_rank_and_scaling(tmp_path, model_config):
    folder = write_adapter(tmp_path / "a", model_config, r=4, alpha=8)
    adapter = load_peft_adapter("a", str(folder), model_config, max_rank=16, dtype=torch.float32)
    assert adapter.rank == 4 and adapter.scaling == 2.0
    assert adapter.target_modules == {"q_proj", "v_proj"}
    assert len(adapter.weights) == 2 * model_config.num_hidden_layers
    rs = write_adapter(tmp_path / "rs", model_config, r=4, alpha=8, config_extra={"use_rslora": True})
    assert load_peft_adapter(
        "rs", str(rs), model_config, max_rank=16, dtype=torch.float32
    ).scaling == 8 / math.sqrt(4)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("rank", "has rank 32, more than --max-lora-rank 16"),
        ("missing_folder", "is not a folder"),
        ("missing_config", "adapter_config.json is missing"),
        ("bad_json", "is not valid JSON"),
        ("unknown_target", "targets fc1, which the model has no LoRA layer for"),
        ("dora", "DoRA adapters are not supported"),
        ("bias", "bias 'all' is not supported"),
        ("bin_only", "reads safetensors only"),
        ("wrong_shape", "was the adapter trained for another base model?"),
        ("embedding", "is not a LoRA A/B weight"),
        ("half_pair", "without its pair"),
        ("past_layers", "past the model's"),
    ],
)
def test_a_bad_adapter_is_refused_with_a_400_saying_why(tmp_path, model_config, case, expected):
    folder = tmp_path / case
    if case == "rank":
        write_adapter(folder, model_config, r=32)
    elif case == "missing_config":
        folder.mkdir()
    elif case == "bad_json":
        write_adapter(folder, model_config)
        (folder / "adapter_config.json").write_text("{not json")
    elif case == "unknown_target":
        write_adapter(folder, model_config, config_extra={"target_modules": ["q_proj", "fc1"]})
    elif case == "dora":
        write_adapter(folder, model_config, config_extra={"use_dora": True})
    elif case == "bias":
        write_adapter(folder, model_config, config_extra={"bias": "all"})
    elif case == "bin_only":
        write_adapter(folder, model_config)
        (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    elif case == "wrong_shape":
        prefix = "base_model.model.model.layers.0.self_attn.q_proj"
        tensors = {f"{prefix}.lora_A.weight": torch.randn(4, 7), f"{prefix}.lora_B.weight": torch.randn(7, 4)}
        write_adapter(folder, model_config, tensors=tensors)
    elif case == "embedding":
        write_adapter(
            folder,
            model_config,
            tensors={"base_model.model.model.embed_tokens.lora_A.weight": torch.randn(4, 4)},
        )
    elif case == "half_pair":
        write_adapter(
            folder,
            model_config,
            tensors={"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 4)},
        )
    elif case == "past_layers":
        layer = model_config.num_hidden_layers
        in_f, out_f = module_shapes(model_config)["q_proj"]
        prefix = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        tensors = {
            f"{prefix}.lora_A.weight": torch.randn(4, in_f),
            f"{prefix}.lora_B.weight": torch.randn(out_f, 4),
        }
        write_adapter(folder, model_config, tensors=tensors)
    cache = AdapterCache(model_config, capacity=4, max_rank=16, dtype=torch.float32)
    with pytest.raises(LoRAError, match=expected) as refused:
        cache.get(LoRARequest(case, str(folder), 1))
    assert refused.value.status == 400
    assert cache.names() == []  # nothing half-loaded


def test_the_host_cache_keeps_the_most_recent_adapters_and_refuses_a_name_under_another_folder(
    tmp_path, model_config
):
    cache = AdapterCache(model_config, capacity=2, max_rank=16, dtype=torch.float32)
    folders = {name: write_adapter(tmp_path / name, model_config) for name in "abc"}
    for i, name in enumerate("abca"):
        cache.get(LoRARequest(name, str(folders[name]), i + 1))
    assert cache.names() == ["c", "a"] and cache.num_loads == 4  # "a" was dropped, then read again
    with pytest.raises(LoRAError, match="already loaded from"):
        cache.get(LoRARequest("a", str(folders["b"]), 9))
    assert cache.drop("c") and not cache.drop("c")
    assert cache.names() == ["a"]
