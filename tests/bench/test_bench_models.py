"""The bundled bench configs (common/models/configs): each parses with its published shapes,
builds at full size (on the meta device) with the parameters model_costs.py counts, and,
as a folder from `pdserve bench make-model` cut to one layer and shrunk in width, loads
for `pdserve serve --load-format dummy`, in fp8 too, and generates."""

from __future__ import annotations

import json

import pytest
import torch

from common.attention.backend_select import get_attention_backend
from common.config.engine_config import EngineConfig
from common.engine.llm_engine import LLMEngine
from common.models.configs import CONFIGS_DIR, bundled_config
from common.models.fp8_weights import Fp8Weight
from common.models.layers import Linear
from common.models.llama import LlamaForCausalLM
from common.models.moe import SparseMoeBlock
from common.sampling_params import SamplingParams
from pdserve.bench.dummy_model import read_model_config
from pdserve.bench.model_costs import ModelCosts
from pdserve.cli.main import main

BUNDLED = sorted(p.stem for p in CONFIGS_DIR.glob("*.json"))
# name -> (architecture, layers, hidden, q heads, kv heads, experts, experts a token, MLP width)
PUBLISHED = {
    "llama-3.1-70b": ("LlamaForCausalLM", 80, 8192, 64, 8, 0, 0, 28672),
    "qwen3-30b-a3b": ("Qwen3MoeForCausalLM", 48, 2048, 32, 4, 128, 8, 768),
    "mixtral-8x7b": ("MixtralForCausalLM", 32, 4096, 32, 8, 8, 2, 14336),
    "llama-3-8b": ("LlamaForCausalLM", 32, 4096, 32, 8, 0, 0, 14336),
    "smollm2-135m": ("LlamaForCausalLM", 30, 576, 9, 3, 0, 0, 1536),
}


def test_every_bundled_config_is_listed_with_its_shapes():
    assert sorted(PUBLISHED) == BUNDLED
    readme = (CONFIGS_DIR / "README.md").read_text()
    assert all(f"`{name}`" in readme for name in BUNDLED)


@pytest.mark.parametrize("name", BUNDLED)
def test_each_bundled_config_parses_with_its_published_shapes(name):
    c = read_model_config(name)
    shapes = (c.architecture, c.num_hidden_layers, c.hidden_size, c.num_attention_heads)
    shapes += (c.num_key_value_heads, c.num_experts, c.num_experts_per_tok, c.mlp_width)
    assert shapes == PUBLISHED[name]
    assert c.torch_dtype == "bfloat16" and not c.tie_word_embeddings or name == "smollm2-135m"


def test_the_moe_and_70b_configs_keep_their_model_specific_fields():
    qwen = read_model_config("qwen3-30b-a3b")
    assert (qwen.head_dim, qwen.qk_norm, qwen.norm_topk_prob, qwen.vocab_size) == (128, True, True, 151936)
    assert (qwen.rope_theta, qwen.max_position_embeddings, qwen.sliding_window) == (1e6, 40960, None)
    mixtral = read_model_config("mixtral-8x7b")
    assert (mixtral.vocab_size, mixtral.rope_theta, mixtral.norm_topk_prob, mixtral.qk_norm) == (
        32000, 1e6, True, False,
    )  # fmt: skip
    llama = read_model_config("llama-3.1-70b")
    assert llama.rope_scaling == {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }  # fmt: skip
    assert (llama.vocab_size, llama.rope_theta, llama.max_position_embeddings) == (128256, 5e5, 131072)


@pytest.mark.parametrize("name", BUNDLED)
def test_each_bundled_config_builds_at_full_size_with_the_counted_parameters(name):
    config = read_model_config(name)
    with torch.device("meta"):
        model = LlamaForCausalLM(config, get_attention_backend("cpu"))
    assert sum(p.numel() for p in model.parameters()) == ModelCosts.from_config(config).total_params


def _shrunk(name: str) -> dict:
    """The bundled config of `name` at toy widths, its kind kept: architecture, RoPE scaling,
    q/k norm, the query-to-KV head ratio where it fits, experts (at most 8, k at most 2)."""
    raw = json.loads(bundled_config(name).read_text())
    heads = 4
    kv = max(1, heads * raw["num_key_value_heads"] // raw["num_attention_heads"])
    small = {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": heads}
    small |= {"num_key_value_heads": kv, "head_dim": 16, "max_position_embeddings": 256}
    if raw.get("rope_scaling"):  # a shorter original context, so the scaling still applies
        small["rope_scaling"] = {**raw["rope_scaling"], "original_max_position_embeddings": 64}
    for key in ("num_experts", "num_local_experts"):
        if key in raw:
            small[key] = min(raw[key], 8)
            small["num_experts_per_tok"] = min(raw["num_experts_per_tok"], 2)
    if "moe_intermediate_size" in raw:
        small["moe_intermediate_size"] = 32
    return raw | small


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    """The embedded model's tokenizer as make-model writes it (transformers exports it once)."""
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("tokenizer")
    assert main(["bench", "make-model", str(out), "--model-config", "smollm2-135m"]) == 0
    return out


@pytest.mark.parametrize("quantization", [None, "fp8"], ids=["dtype", "fp8"])
@pytest.mark.parametrize("name", BUNDLED)
def test_make_model_folders_load_with_dummy_weights_and_generate(
    name, quantization, tmp_path, tokenizer_folder
):
    shrunk = tmp_path / "shrunk.json"
    shrunk.write_text(json.dumps(_shrunk(name)))
    folder = tmp_path / "model"
    argv = ["bench", "make-model", str(folder), "--model-config", str(shrunk), "--num-layers", "1"]
    assert main([*argv, "--tokenizer", str(tokenizer_folder)]) == 0
    written = json.loads((folder / "config.json").read_text())
    assert written["num_hidden_layers"] == 1 and written["vocab_size"] == 49152
    assert (folder / "tokenizer.json").is_file()

    config = EngineConfig(
        model=str(folder), load_format="dummy", quantization=quantization, device="cpu",
        block_size=4, max_model_len=64, num_gpu_blocks_override=32,
    )  # fmt: skip
    engine = LLMEngine.from_config(config)
    model = engine.model
    assert model.config.architecture == PUBLISHED[name][0]
    if model.config.num_experts:  # every stacked expert filled, not left uninitialised
        (block,) = [m for m in model.modules() if isinstance(m, SparseMoeBlock)]
        assert all(float(w.float().std()) == pytest.approx(0.02, rel=0.2) for w in (block.w13, block.w2))
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert all(isinstance(m.packed, Fp8Weight) == (quantization == "fp8") for m in linears)
    engine.add_request(
        "r", list(range(5, 17)), SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    )
    tokens = []
    while engine.has_unfinished_requests():
        tokens += [t for out in engine.step() for t in out.new_token_ids]
    assert len(tokens) == 3


def test_a_layer_count_outside_the_config_is_refused_naming_the_range(tmp_path):
    with pytest.raises(
        ValueError, match="--num-layers 49: the config has 48 layers; pass a number from 1 to 48"
    ):
        read_model_config("qwen3-30b-a3b", num_layers=49)
    assert read_model_config("qwen3-30b-a3b", num_layers=2).num_hidden_layers == 2
