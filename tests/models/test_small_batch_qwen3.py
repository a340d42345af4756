"""Qwen3 and mixture-of-experts models on the fused small-batch layer (forward_small_batch):
rotary_write_kv with Qwen3's per-head q/k RMSNorm folded in gives torch's norm, RoPE and K/V
write; a decode step of a tiny Qwen3, Qwen3-MoE and Mixtral through the fused layer gives the
general path's logits and cache; and the layer is refused them while
layers.FUSE_SMALL_BATCH_QWEN3 (and, for experts, moe.USE_SMALL_BATCH_MOE) is off (both are on
by default; a dense Llama's own switch, layers.USE_FUSED_SMALL_BATCH, plays no part).

Kernels compile on a CUDA device and run in Triton's interpreter on CPU (switched on by
conftest.py), in fp32 and fp16 only there: the interpreter's tl.dot is wrong on bf16.
"""

from __future__ import annotations

import functools
import types

import pytest
import torch

from common.attention.backend_select import get_attention_backend
from common.attention.reference import write_kv
from common.models import fused_moe_triton, layers, moe
from common.models import llama as llama_module
from common.models import triton_layers as kernels
from common.models.layers import RMSNorm, RotaryEmbedding, _rotate
from common.models.llama import LlamaForCausalLM
from tests.models.test_triton_layers import DEVICE, DTYPES, MATMUL_CONFIG, _close, _decode_step_logits, _randn
from tests.tiny_llama import tiny_config

# --- the kernel --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(4, 2, 32), (6, 3, 24), (5, 1, 16)])  # (Hq, Hkv, D)
def test_rotary_write_kv_with_qk_norm_is_torch_rms_norm_then_rope_then_the_write(dtype, heads):
    num_q, num_kv, head_dim = heads
    rotary = RotaryEmbedding(head_dim, 512, 10000.0, None).to(DEVICE)
    q_norm, k_norm = RMSNorm(head_dim, 1e-6).to(DEVICE, dtype), RMSNorm(head_dim, 1e-6).to(DEVICE, dtype)
    with torch.no_grad():  # weights far from 1, so a kernel that skips them fails
        q_norm.weight.copy_(_randn(head_dim, dtype=dtype, seed=1) * 0.5 + 1.0)
        k_norm.weight.copy_(_randn(head_dim, dtype=dtype, seed=2) * 0.5 + 1.0)
    tokens, block_size = 5, 4
    qkv = _randn(tokens, (num_q + 2 * num_kv) * head_dim, dtype=dtype, seed=3) * 4
    positions = torch.tensor([0, 3, 17, 200, 511], device=DEVICE)
    slots = torch.tensor([5, -1, 6, 12, 0], device=DEVICE)  # -1: a padding token, nothing kept

    def split(t):
        q, k, v = t.split([num_q * head_dim, num_kv * head_dim, num_kv * head_dim], dim=-1)
        return (
            q.view(tokens, num_q, head_dim),
            k.view(tokens, num_kv, head_dim),
            v.view(tokens, num_kv, head_dim),
        )

    cache = torch.zeros(4, 2, 2, num_kv, block_size, head_dim, device=DEVICE, dtype=dtype)
    eq, ek, ev = split(qkv.clone())
    with torch.no_grad():  # the torch ops, on CUDA too
        cos, sin = rotary._tables(positions, dtype)
        expected_q, expected_k = _rotate(q_norm._norm(eq), cos, sin), _rotate(k_norm._norm(ek), cos, sin)
    expected_cache = cache.clone()
    write_kv(expected_k, ev, expected_cache, 1, slots)

    q, k, v = split(qkv.clone())
    got_cache = cache.clone()
    kernels.rotary_write_kv(
        positions, q, k, v, rotary.cos, rotary.sin, got_cache, 1, slots,
        q_norm_weight=q_norm.weight, k_norm_weight=k_norm.weight, eps=q_norm.eps,
    )  # fmt: skip

    _close(q, expected_q, dtype)
    _close(got_cache, expected_cache, dtype)
    if DEVICE.type == "cpu" and dtype == torch.float16:
        # interpreted, every rounding is torch's: the fp16 roundings hide the fp32 sums' order
        assert torch.equal(q, expected_q)
        assert torch.equal(got_cache, expected_cache)
    assert torch.equal(got_cache[:, 0], cache[:, 0])  # other layers untouched
    assert torch.equal(k, split(qkv)[1])  # k itself is left as it was: its rows went to the cache
    # without the norms the same call gives something else: the comparison above can fail
    plain_q = split(qkv.clone())[0]
    kernels.rotary_write_kv(
        positions, plain_q, *split(qkv.clone())[1:], rotary.cos, rotary.sin, cache, 1, slots
    )
    assert ((plain_q.float() - expected_q.float()).norm() / expected_q.float().norm()) > 0.1


def test_rotary_write_kv_takes_both_norm_weights_of_the_head_size_or_neither():
    q = torch.zeros(2, 4, 16, device=DEVICE)
    k = v = torch.zeros(2, 2, 16, device=DEVICE)
    rotary = RotaryEmbedding(16, 32, 10000.0, None).to(DEVICE)
    cache = torch.zeros(2, 1, 2, 2, 4, 16, device=DEVICE)
    args = (torch.zeros(2, dtype=torch.int64, device=DEVICE), q, k, v, rotary.cos, rotary.sin, cache, 0)
    slots = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    weight = torch.ones(16, device=DEVICE)
    with pytest.raises(ValueError, match="both norm weights or neither"):
        kernels.rotary_write_kv(*args, slots, q_norm_weight=weight)
    with pytest.raises(ValueError, match=r"contiguous \[16\]"):
        kernels.rotary_write_kv(
            *args, slots, q_norm_weight=weight, k_norm_weight=torch.ones(8, device=DEVICE)
        )


# --- the layer ---------------------------------------------------------------------------

MODELS = {
    "qwen3": dict(architecture="Qwen3ForCausalLM", qk_norm=True),
    "qwen3-moe": dict(
        architecture="Qwen3MoeForCausalLM", qk_norm=True, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=48, norm_topk_prob=True,
    ),
    "mixtral": dict(
        architecture="MixtralForCausalLM", num_experts=6, num_experts_per_tok=2, moe_intermediate_size=40,
        norm_topk_prob=True,
    ),
}  # fmt: skip
PLAIN_LLAMA = dict(architecture="LlamaForCausalLM")  # neither: the new switch leaves it alone
NUM_LAYERS = 2


def _tiny_model(name: str, dtype: torch.dtype = torch.float16) -> LlamaForCausalLM:
    """6 query heads over 2 KV heads (no power of 2), every weight random, norms around 1."""
    config = tiny_config(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=NUM_LAYERS,
        num_attention_heads=6, num_key_value_heads=2, head_dim=16, **{**MODELS, "llama": PLAIN_LLAMA}[name],
    )  # fmt: skip
    with torch.device(DEVICE):
        model = LlamaForCausalLM(config, get_attention_backend(DEVICE.type)).to(dtype)
    generator = torch.Generator(device=DEVICE.type).manual_seed(0)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.endswith("norm.weight"):
                param.normal_(1.0, 0.2, generator=generator)
            else:
                param.normal_(0.0, 0.15, generator=generator)
    return model.eval()


def _decode_step(model, dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a decode step of two requests after their prefill (27 tokens: the general
    path), and the K/V slots the two steps wrote."""
    return _decode_step_logits(model, DEVICE.type, dtype)


INTERPRETED = types.SimpleNamespace(
    small_m_matmul=functools.partial(kernels.small_m_matmul, config=MATMUL_CONFIG),
    small_m_matmul_fits=kernels.small_m_matmul_fits,
    rotary_write_kv=kernels.rotary_write_kv,
    rms_norm=kernels.rms_norm,
    silu_and_mul=kernels.silu_and_mul,
)


def _kernels_as_on_cuda(monkeypatch) -> None:
    """The layer and MoE kernels offered as on a CUDA device, for batches of at most 16 tokens
    (a prefill keeps the torch path, as the reference run's did); the switches still choose."""
    monkeypatch.setattr(layers, "_cuda_kernels", lambda x: INTERPRETED if x.shape[0] <= 16 else None)
    monkeypatch.setattr(moe, "fused_moe_kernels", lambda t: fused_moe_triton if t.shape[0] <= 16 else None)


@pytest.mark.parametrize("name", MODELS)
def test_a_decode_step_through_the_fused_layer_gives_the_general_paths_logits_and_cache(monkeypatch, name):
    model = _tiny_model(name)
    plain, plain_cache = _decode_step(model)

    _kernels_as_on_cuda(monkeypatch)
    monkeypatch.setattr(layers, "FUSE_SMALL_BATCH_QWEN3", True)
    monkeypatch.setattr(moe, "USE_SMALL_BATCH_MOE", True)
    taken, expert_calls = [], []
    real_layer = llama_module.DecoderLayer.forward_small_batch
    real_experts = fused_moe_triton.fused_moe_small_batch

    def layer_spy(self, *args):
        taken.append(self.self_attn.layer_idx)
        return real_layer(self, *args)

    def experts_spy(*args, **kwargs):
        expert_calls.append(args[6])  # weights_in_model_dtype
        return real_experts(*args, **kwargs)

    monkeypatch.setattr(llama_module.DecoderLayer, "forward_small_batch", layer_spy)
    monkeypatch.setattr(fused_moe_triton, "fused_moe_small_batch", experts_spy)
    fused, fused_cache = _decode_step(model)

    assert taken == list(range(NUM_LAYERS))  # the decode step's layers, each on the fused path
    if model.config.num_experts:
        assert expert_calls == [name == "qwen3-moe"] * NUM_LAYERS
    _close(fused, plain, torch.float16)
    _close(fused_cache, plain_cache, torch.float16)


@pytest.mark.parametrize("name", MODELS)
def test_with_the_switches_off_qwen3_and_moe_models_keep_the_general_path(monkeypatch, name):
    model = _tiny_model(name)
    llama = _tiny_model("llama")
    x = torch.zeros(2, 64, dtype=torch.float16, device=DEVICE)
    _kernels_as_on_cuda(monkeypatch)
    monkeypatch.setattr(moe, "USE_SMALL_BATCH_MOE", True)

    monkeypatch.setattr(layers, "FUSE_SMALL_BATCH_QWEN3", False)
    monkeypatch.setattr(layers, "USE_FUSED_SMALL_BATCH", True)  # the dense Llama's switch
    assert model._small_batch_kernels(x) is None
    assert llama._small_batch_kernels(x) is INTERPRETED

    monkeypatch.setattr(layers, "FUSE_SMALL_BATCH_QWEN3", True)
    monkeypatch.setattr(layers, "USE_FUSED_SMALL_BATCH", False)  # not needed by these models
    assert model._small_batch_kernels(x) is INTERPRETED
    assert llama._small_batch_kernels(x) is None
    if not model.config.num_experts:
        return
    monkeypatch.setattr(moe, "USE_SMALL_BATCH_MOE", False)
    assert model._small_batch_kernels(x) is None
    monkeypatch.setattr(moe, "USE_SMALL_BATCH_MOE", True)
    monkeypatch.setattr(moe, "fused_moe_kernels", lambda t: None)  # no Triton MoE kernels here
    assert model._small_batch_kernels(x) is None
    _kernels_as_on_cuda(monkeypatch)
    for layer in model.layers:  # a tensor-parallel rank's experts: partial sums to all-reduce
        monkeypatch.setattr(layer.mlp, "group", object())
    assert model._small_batch_kernels(x) is None
