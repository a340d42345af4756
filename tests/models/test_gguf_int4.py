"""GGUF blocks kept quantized on the CPU (--quantization gguf, common/models/gguf_int4.py).

The int4 operands must hold exactly the weights gguf's own dequantizer gives for every
supported block type; a model loaded with them must stay near the dense fp32 model (the
kernel takes bf16 activations and scales: the tolerance below is the one docs/quantization.md
states), and the choice of method follows vLLM's rule with clear refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.attention.reference import TorchAttentionBackend
from common.config.quantization import resolve_quantization
from common.models.gguf_int4 import PackedInt4Weight, concat_rows, int4_parts
from common.models.layers import Linear
from common.models.loader import load_model
from tests.models.test_gguf_architectures import tiny_hf_model, write_gguf

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

BLOCK_TYPES = [Q.Q4_0, Q.Q4_1, Q.Q8_0]
# the quantized path against the dense fp32 one, on random prompts: |logit diff| at most this
# share of the largest logit, and the arg max the same at this share of positions at least
LOGIT_REL_TOL = 0.08
TOP1_AGREEMENT = 0.85


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_int4_parts_hold_exactly_the_weights_gguf_dequantizes(qtype):
    w = np.random.default_rng(0).standard_normal((48, 96)).astype(np.float32)
    raw = quantize(w, qtype)
    parts = int4_parts(raw, qtype)
    assert all(int(p.q.min()) >= 0 and int(p.q.max()) <= 15 for p in parts)
    ours = sum(p.dequantize() for p in parts)
    assert torch.equal(ours, torch.from_numpy(dequantize(raw, qtype)))


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_packed_matmul_is_x_times_the_dequantized_weight_at_bf16_precision(qtype):
    w = np.random.default_rng(1).standard_normal((64, 128)).astype(np.float32)
    raw = quantize(w, qtype)
    dense = torch.from_numpy(dequantize(raw, qtype))
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(2))
    y = PackedInt4Weight(int4_parts(raw, qtype)).matmul(x)
    assert y.dtype == torch.float32 and y.shape == (5, 64)
    ref = x @ dense.T
    assert float((y - ref).norm() / ref.norm()) < 1e-2


def test_fused_rows_concatenate_per_part_and_mixed_block_types_are_refused():
    rng = np.random.default_rng(3)
    a, b = (quantize(rng.standard_normal((r, 64)).astype(np.float32), Q.Q4_1) for r in (32, 16))
    fused = concat_rows([int4_parts(a, Q.Q4_1), int4_parts(b, Q.Q4_1)])
    expected = np.concatenate([dequantize(a, Q.Q4_1), dequantize(b, Q.Q4_1)])
    assert torch.equal(fused[0].dequantize(), torch.from_numpy(expected))
    c = quantize(rng.standard_normal((8, 64)).astype(np.float32), Q.Q8_0)
    with pytest.raises(ValueError, match="different GGUF block types"):
        concat_rows([int4_parts(a, Q.Q4_1), int4_parts(c, Q.Q8_0)])


def _write_quantized_gguf(tmp_path, qtype, tied: bool):
    """A tiny llama GGUF whose matmul weights (and embedding) are stored as `qtype` blocks."""
    hf = tiny_hf_model(transformers.LlamaConfig, tie_word_embeddings=tied)
    return write_gguf(hf, tmp_path / f"tiny-{qtype.name}.gguf", "llama", block_type=qtype)


def _logits(model, prompt: list[int], runner_cls) -> torch.Tensor:
    return runner_cls(model, block_size=4, num_blocks=64).step([("a", prompt)])["a"]


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_a_quantized_file_loads_packed_with_the_same_weights_and_near_logits(
    qtype, tied, tmp_path, paged_runner
):
    source = _write_quantized_gguf(tmp_path, qtype, tied)
    dense, _ = load_model(source, dtype=torch.float32, device="cpu", attn_backend=TorchAttentionBackend())
    packed, _ = load_model(
        source, dtype=torch.float32, device="cpu", attn_backend=TorchAttentionBackend(), quantization="gguf"
    )
    linears = [m for m in packed.modules() if isinstance(m, Linear)]
    assert linears and all(m.packed is not None for m in linears)
    assert packed.lm_head_packed is not None
    # the packed operands hold the weights the dense path dequantized, row for row
    dense_linears = [m for m in dense.modules() if isinstance(m, Linear)]
    for ours, theirs in zip(linears, dense_linears, strict=True):
        assert ours.weight.shape == theirs.weight.shape
        layer = ours.packed.matmul(torch.eye(ours.weight.shape[1]))  # x = I: the weight, transposed
        assert torch.allclose(layer.T, theirs.weight, rtol=1e-2, atol=1e-2)
    prompt = list(range(3, 60))
    ref, ours = _logits(dense, prompt, paged_runner), _logits(packed, prompt, paged_runner)
    assert float((ours - ref).abs().max()) <= LOGIT_REL_TOL * float(ref.abs().max())


def test_the_embedded_model_quantized_stays_within_the_stated_tolerance(
    smollm2_source, smollm2_model, paged_runner
):
    dense, _ = smollm2_model
    packed, _ = load_model(
        smollm2_source,
        dtype="float32",
        device="cpu",
        attn_backend=TorchAttentionBackend(),
        quantization="gguf",
    )
    assert all(m.packed is not None for m in packed.modules() if isinstance(m, Linear))
    g = torch.Generator().manual_seed(0)
    for length in (8, 48, 120):
        prompt = torch.randint(100, 49000, (length,), generator=g).tolist()
        ref, ours = _logits(dense, prompt, paged_runner), _logits(packed, prompt, paged_runner)
        assert float((ours - ref).abs().max()) <= LOGIT_REL_TOL * float(ref.abs().max()), length
        agreement = float((ours.argmax(-1) == ref.argmax(-1)).float().mean())
        assert agreement >= TOP1_AGREEMENT, (length, agreement)


def test_quantization_follows_vllms_rule_and_refuses_what_cannot_serve():
    assert resolve_quantization(None, "gguf", "cpu", 1) == "gguf"
    assert resolve_quantization(None, "gguf", "cuda", 1) is None  # dequantized on a GPU
    assert resolve_quantization(None, "gguf", "cpu", 2) is None
    assert resolve_quantization(None, "safetensors", "cpu", 1) is None
    assert resolve_quantization("none", "gguf", "cpu", 1) is None
    assert resolve_quantization("gguf", "gguf", "cpu", 1) == "gguf"
    with pytest.raises(ValueError, match="needs a GGUF model"):
        resolve_quantization("gguf", "safetensors", "cpu", 1)
    with pytest.raises(ValueError, match="on the CPU only"):
        resolve_quantization("gguf", "gguf", "cuda", 1)
    with pytest.raises(ValueError, match="tensor-parallel-size"):
        resolve_quantization("gguf", "gguf", "cpu", 2)
