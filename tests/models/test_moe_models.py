"""Tiny random mixture-of-experts models (Qwen3-MoE, Mixtral) saved by transformers as safetensors:
pdserve loads them and gives transformers' logits (packed, chunked and decoding through the
paged cache), transformers' greedy tokens through the engine and through prefill -> decode;
a config.json with an MoE field pdserve does not implement is refused, naming the field."""

from __future__ import annotations

import re

import pytest
import torch

from common.attention.reference import TorchAttentionBackend
from common.config.engine_config import EngineConfig
from common.engine.llm_engine import LLMEngine
from common.lora.lora_layer import attach_lora
from common.models.config import ModelConfig
from common.models.fp8_weights import quantize_rows
from common.models.loader import load_model
from common.sampling_params import SamplingParams
from tests.engine.direct_kv_transfer import pair, run_decode, run_prefill
from tests.models.test_hf_folders_match_transformers import (
    check_against_transformers,
    hf_logits,
    load,
    make_tiny_hf_model,
    save,
)
from tests.tiny_llama import tiny_hf_config

transformers = pytest.importorskip("transformers")

# No EOS, so transformers' generate runs as long as the engine with ignore_eos.
_NO_EOS = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
CASES = {
    "qwen3-moe-norm-topk": (
        transformers.Qwen3MoeConfig,
        dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True, **_NO_EOS),
    ),
    "qwen3-moe-unnormalised": (
        transformers.Qwen3MoeConfig,
        dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=False, **_NO_EOS),
    ),
    "mixtral": (
        transformers.MixtralConfig,
        dict(num_local_experts=6, num_experts_per_tok=2, sliding_window=None, rope_theta=1e6, **_NO_EOS),
    ),
}
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
PROMPTS = [[(7 * i + 3 * k) % 200 + 5 for k in range(n)] for i, n in enumerate((5, 19, 30))]


@pytest.fixture(scope="module", params=CASES.values(), ids=CASES.keys())
def tiny_moe(request, tmp_path_factory):
    """(transformers' model, its folder, pdserve's model loaded from the folder)."""
    config_cls, overrides = request.param
    hf_model = make_tiny_hf_model(config_cls, overrides)
    source = save(hf_model, tmp_path_factory.mktemp("moe"))
    return hf_model, source, load(source)


def test_loads_every_expert_and_matches_transformers_logits(tiny_moe, paged_runner, logits_close):
    hf_model, _, ours = tiny_moe
    config = ours.config
    assert config.architecture == type(hf_model).__name__
    assert config.num_experts == hf_model.config.num_local_experts
    experts = hf_model.model.layers[1].mlp.experts
    torch.testing.assert_close(ours.layers[1].mlp.w13, experts.gate_up_proj, rtol=0, atol=0)
    torch.testing.assert_close(ours.layers[1].mlp.w2, experts.down_proj, rtol=0, atol=0)
    check_against_transformers(ours, hf_model, paged_runner(ours), logits_close)


def test_chunked_prefill_mixed_with_decode_matches_transformers(tiny_moe, paged_runner, logits_close):
    hf_model, _, ours = tiny_moe
    runner = paged_runner(ours)
    long, short = PROMPTS[2], PROMPTS[0]
    runner.step([("short", short)])
    seqs = {"short": list(short), "long": []}
    for start in range(0, len(long), 7):  # the long prompt in chunks, packed with short's decode steps
        chunk = long[start : start + 7]
        seqs["long"] += chunk
        seqs["short"].append(17 + start)
        out = runner.step([("long", chunk), ("short", seqs["short"][-1:])])
        logits_close(out["long"], hf_logits(hf_model, seqs["long"])[-len(chunk) :])
        logits_close(out["short"], hf_logits(hf_model, seqs["short"])[-1:])


def hf_greedy(hf_model, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = hf_model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=GREEDY.max_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def test_engine_greedy_tokens_equal_transformers_generate(tiny_moe):
    hf_model, source, _ = tiny_moe
    config = EngineConfig(
        model=str(source.path),
        device="cpu",
        block_size=4,
        max_model_len=128,
        enable_chunked_prefill=True,
        max_num_batched_tokens=16,  # the 30-token prompt is prefilled in chunks
        num_gpu_blocks_override=64,
    )
    engine = LLMEngine.from_config(config)
    assert engine.generate(PROMPTS, GREEDY) == [hf_greedy(hf_model, p) for p in PROMPTS]


def test_prefill_then_kv_pull_then_decode_gives_transformers_tokens(tiny_moe):
    hf_model, _, ours = tiny_moe
    _, prefill, decode = pair((ours, ours.config))
    expected = [hf_greedy(hf_model, p) for p in PROMPTS]
    requests = {}
    for i, prompt in enumerate(PROMPTS):
        out = run_prefill(prefill, f"r{i}", prompt, GREEDY)
        assert out.new_token_ids == expected[i][:1]
        requests[f"r{i}"] = (prompt, {**out.kv_transfer_params, "first_token_id": out.new_token_ids[0]})
    tokens, done = run_decode(decode, requests, GREEDY)
    assert [tokens[f"r{i}"] for i in range(len(PROMPTS))] == [e[1:] for e in expected]
    assert set(done.values()) == {"length"}


def test_quantization_fp8_quantizes_every_expert_at_load(tiny_moe, paged_runner):
    # on the CPU each expert's fp8 values are dequantized into its dense weights, once
    _, source, dense = tiny_moe
    fp8, _ = load_model(
        source, dtype=torch.float32, device="cpu", attn_backend=TorchAttentionBackend(), quantization="fp8"
    )
    for ours, theirs in zip(fp8.layers, dense.layers, strict=True):
        for name in ("w13", "w2"):
            q, scales = quantize_rows(getattr(theirs.mlp, name))
            expected = q.float() * scales[..., None]
            torch.testing.assert_close(getattr(ours.mlp, name), expected, rtol=0, atol=0)
            assert not torch.equal(getattr(ours.mlp, name), getattr(theirs.mlp, name))
    logits = paged_runner(fp8).step([("a", PROMPTS[1])])["a"]
    assert logits.shape == (len(PROMPTS[1]), fp8.config.vocab_size) and logits.isfinite().all()
    # fp8 experts alone move these tiny models' logits by 4-6% of the largest. With every
    # linear layer in fp8 too, fp8 rounding flips a top-k expert choice at a few positions
    # (2-6 of 38 token-layers for prompt 1), whose logits then move by 30-70%, while the
    # others stay within 11-13%: routing is discontinuous, so only the experts' share is
    # held to a bound here
    experts_only = load(source)
    for layer in experts_only.layers:
        layer.mlp.quantize_fp8()
    got = paged_runner(experts_only).step([("a", PROMPTS[1])])["a"]
    want = paged_runner(dense).step([("a", PROMPTS[1])])["a"]
    assert (got - want).abs().max() <= 0.1 * want.abs().max()


QWEN3_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)


@pytest.mark.parametrize(
    "arch, fields, named",
    [
        ("Qwen3MoeForCausalLM", dict(decoder_sparse_step=2), "decoder_sparse_step=2"),
        ("Qwen3MoeForCausalLM", dict(mlp_only_layers=[0]), "mlp_only_layers=[0]"),
        (
            "Qwen3MoeForCausalLM",
            dict(shared_expert_intermediate_size=64),
            "shared_expert_intermediate_size=64",
        ),
        ("Qwen3MoeForCausalLM", dict(num_experts_per_tok=5), "num_experts_per_tok 5"),
        ("MixtralForCausalLM", dict(sliding_window=64), "sliding_window=64"),
    ],
)
def test_an_unsupported_moe_field_is_refused_by_name(arch, fields, named):
    base = QWEN3_MOE if arch == "Qwen3MoeForCausalLM" else dict(num_local_experts=4, num_experts_per_tok=2)
    with pytest.raises(ValueError, match=re.escape(f"{arch}: {named}")):
        ModelConfig.from_hf_config(tiny_hf_config(arch, **{**base, **fields}))


def test_inference_only_fields_and_a_window_as_long_as_the_context_are_accepted():
    mixtral = tiny_hf_config(
        "MixtralForCausalLM",
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=128,  # = max_position_embeddings: full attention
        router_jitter_noise=0.1,
        output_router_logits=True,
    )
    config = ModelConfig.from_hf_config(mixtral)
    assert (config.num_experts, config.moe_intermediate_size, config.norm_topk_prob) == (4, 96, True)
    assert config.max_position_embeddings == 128
    qwen = ModelConfig.from_hf_config(
        tiny_hf_config("Qwen3MoeForCausalLM", **QWEN3_MOE, decoder_sparse_step=1, mlp_only_layers=[])
    )
    assert (qwen.num_experts, qwen.moe_intermediate_size, qwen.norm_topk_prob, qwen.qk_norm) == (
        4,
        32,
        False,
        True,
    )


def test_lora_adapters_on_an_moe_model_are_refused(tiny_moe):
    _, _, ours = tiny_moe
    with pytest.raises(ValueError, match="--enable-lora: LoRA adapters on a mixture-of-experts model"):
        attach_lora(ours, num_slots=1, max_rank=8, dtype=torch.float32)
