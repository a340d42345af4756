"""fp8 weights (--quantization fp8; common/models/fp8_weights.py, common/models/weights_fp8.py,
common/config/checkpoint_quantization.py).

Dynamic quantization at load must stay within the tolerance docs/quantization.md states; a
checkpoint written here in each supported layout, its weights quantized by this file's own
arithmetic and its config.json written as the real formats are, must load to exactly those
weights; each malformed checkpoint must be refused naming what is wrong. The GPU GEMM
(torch._scaled_mm) is checked against the dequantized weights where a GPU is (marker `gpu`).
"""

from __future__ import annotations

import functools
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.attention.reference import TorchAttentionBackend
from common.config.checkpoint_quantization import checkpoint_fp8_scheme
from common.config.quantization import resolve_quantization
from common.model_files import ModelSource
from common.models import fp8_weights
from common.models.fp8_weights import FP8, FP8_MAX, Fp8Weight
from common.models.layers import Linear
from common.models.loader import load_model
from tests.tiny_llama import TINY_HF_SHAPE

transformers = pytest.importorskip("transformers")

# dynamic fp8 of the embedded model against its fp32 path, on random prompts: |logit diff| at
# most this share of the largest logit, and the arg max the same at this share of positions
LOGIT_REL_TOL = 0.25
TOP1_AGREEMENT = 0.65
# an fp8 checkpoint of the tiny model (weights with std 0.15) against the dense one it came from
TINY_LOGIT_REL_TOL = 0.1
LINEAR_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BLOCK = (32, 48)  # rows end on q/k/v and gate/up boundaries; 64 columns make a partial block


def _load(source, **kwargs):
    return load_model(
        source, dtype=torch.float32, device="cpu", attn_backend=TorchAttentionBackend(), **kwargs
    )[0]


def _logits(model, prompt, runner_cls) -> torch.Tensor:
    return runner_cls(model, block_size=4, num_blocks=64).step([("a", prompt)])["a"]


# --- the weight object ------------------------------------------------------------------


def test_dynamic_quantization_scales_each_output_channel_to_the_fp8_range():
    w = torch.randn(48, 80, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 3, 48)[:, None]
    fp8 = Fp8Weight.quantize(w)
    assert fp8.weight.dtype == FP8 and fp8.scale.shape == (48,)
    assert torch.allclose(fp8.scale, w.abs().amax(dim=1) / FP8_MAX)
    # every row's largest weight lands on ±448, and each weight within half an fp8 step (3 bits)
    assert torch.equal(fp8.weight.float().abs().amax(dim=1), torch.full((48,), FP8_MAX))
    err = (fp8.dequantize() - w).abs()
    assert bool((err <= w.abs() * 2**-4 + fp8.scale[:, None] * 2**-9).all())


def test_matmul_on_the_cpu_is_x_times_the_dequantized_weight():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    fp8 = Fp8Weight.quantize(w, torch.float32)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(2))
    y = fp8.matmul(x)
    assert y.shape == (3, 5, 32) and y.dtype == torch.float32
    assert torch.allclose(y, x @ fp8.dequantize().T, atol=1e-5)


def test_block_scales_cover_partial_blocks_and_fused_rows_keep_each_parts_scales():
    g = torch.Generator().manual_seed(3)
    q = (torch.randn(64, 64, generator=g) * 100).to(FP8)
    scale = torch.rand(2, 2, generator=g) + 0.5  # 32x48 blocks over 64 columns: the second is partial
    fp8 = Fp8Weight(q, scale, BLOCK, compute_dtype=torch.float32)
    expected = q.float().clone()
    for i in range(2):
        for j in range(2):
            expected[32 * i : 32 * (i + 1), 48 * j : 48 * (j + 1)] *= scale[i, j]
    assert torch.equal(fp8.dequantize(), expected)
    a, b = (
        Fp8Weight(q[:n], torch.full((n,), s), input_scale=torch.tensor(t))
        for n, s, t in ((16, 2.0, 0.5), (8, 3.0, 0.7))
    )
    fused = Fp8Weight.fuse_rows([a, b], torch.float32)
    assert torch.equal(fused.dequantize(), torch.cat([q[:16].float() * 2, q[:8].float() * 3]))
    assert float(fused.input_scale) == pytest.approx(0.7)  # one activation scale: the largest
    with pytest.raises(ValueError, match="mix per-row and block-wise"):
        Fp8Weight.fuse_rows([fp8, a])


# --- dynamic quantization of the embedded model ---------------------------------------


def test_the_embedded_model_in_fp8_stays_within_the_stated_tolerance(
    smollm2_source, smollm2_model, paged_runner
):
    dense, _ = smollm2_model
    fp8 = _load(smollm2_source, quantization="fp8")  # the GGUF dequantized, then quantized to fp8
    linears = [m for m in fp8.modules() if isinstance(m, Linear)]
    assert linears and all(isinstance(m.packed, Fp8Weight) for m in linears)
    assert fp8.lm_head_packed is None and fp8.embed_tokens.dtype == torch.float32  # kept dense, as vLLM
    g = torch.Generator().manual_seed(0)
    for length in (8, 48, 120):
        prompt = torch.randint(100, 49000, (length,), generator=g).tolist()
        ref, ours = _logits(dense, prompt, paged_runner), _logits(fp8, prompt, paged_runner)
        assert float((ours - ref).abs().max()) <= LOGIT_REL_TOL * float(ref.abs().max()), length
        agreement = float((ours.argmax(-1) == ref.argmax(-1)).float().mean())
        assert agreement >= TOP1_AGREEMENT, (length, agreement)


def test_the_embedded_model_in_fp8_stays_within_the_stated_tolerance_of_bf16(smollm2_source, paged_runner):
    """The same bound against the dense model in bf16, the dtype fp8 computes in on a GPU."""

    def load(quantization):
        return load_model(
            smollm2_source, dtype=torch.bfloat16, device="cpu", attn_backend=TorchAttentionBackend(),
            quantization=quantization,
        )[0]  # fmt: skip

    dense, fp8 = load(None), load("fp8")
    g = torch.Generator().manual_seed(0)
    for length in (8, 48, 120):
        prompt = torch.randint(100, 49000, (length,), generator=g).tolist()
        ref = _logits(dense, prompt, paged_runner).float()
        ours = _logits(fp8, prompt, paged_runner).float()
        assert float((ours - ref).abs().max()) <= LOGIT_REL_TOL * float(ref.abs().max()), length
        agreement = float((ours.argmax(-1) == ref.argmax(-1)).float().mean())
        assert agreement >= TOP1_AGREEMENT, (length, agreement)


def test_dummy_weights_load_in_fp8_for_benchmarks(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], **TINY_HF_SHAPE})
    )
    model = _load(ModelSource("hf_dir", tmp_path, "tiny"), load_format="dummy", quantization="fp8")
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert linears and all(isinstance(m.packed, Fp8Weight) for m in linears)
    assert all(float(m.packed.dequantize().abs().max()) > 0 for m in linears)


# --- pre-quantized checkpoints -------------------------------------------------------


def _quantize(w: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fp8 values, the scale tensor as the layout stores it, the dequantized weight): written
    out longhand, apart from the code under test."""
    n, k = w.shape
    if layout == "tensor":
        s = w.abs().max() / 448
        full = s.expand(n, k)
    elif layout == "channel":
        s = w.abs().amax(dim=1) / 448
        full = s[:, None].expand(n, k)
    else:
        bn, bk = BLOCK
        rows, cols = -(-n // bn), -(-k // bk)
        s = torch.empty(rows, cols)
        full = torch.empty(n, k)
        for i in range(rows):
            for j in range(cols):
                block = w[i * bn : (i + 1) * bn, j * bk : (j + 1) * bk]
                s[i, j] = block.abs().max() / 448
                full[i * bn : (i + 1) * bn, j * bk : (j + 1) * bk] = s[i, j]
    q = (w / full).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q, s, q.float() * full


# (method, weight layout, static activations): each way a real checkpoint stores fp8
LAYOUTS = {
    "fp8-per-tensor-static": ("fp8", "tensor", True),
    "fp8-per-channel": ("fp8", "channel", False),
    "fp8-block": ("fp8", "block", False),
    "compressed-tensors-per-tensor-static": ("compressed-tensors", "tensor", True),
    "compressed-tensors-per-channel": ("compressed-tensors", "channel", False),
}


def _quantization_config(method: str, layout: str, static: bool) -> dict:
    if method == "fp8":
        qc = {"quant_method": "fp8", "activation_scheme": "static" if static else "dynamic"}
        if layout == "block":
            qc["weight_block_size"] = list(BLOCK)
        return qc
    acts = {"type": "float", "num_bits": 8, "symmetric": True}
    acts |= {"dynamic": False, "strategy": "tensor"} if static else {"dynamic": True, "strategy": "token"}
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "ignore": ["lm_head"],
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "type": "float",
                    "num_bits": 8,
                    "strategy": layout,
                    "symmetric": True,
                    "dynamic": False,
                },
                "input_activations": acts,
            }
        },
    }


def _tiny_hf():
    """The same tiny transformers Llama on every call: weights N(0, 0.15²)."""
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_HF_SHAPE))
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.15)
    return hf


def _write_fp8_checkpoint(folder, name: str) -> tuple[ModelSource, dict[str, torch.Tensor]]:
    """A tiny transformers Llama saved, then its linear layers' weights rewritten in fp8 in the
    layout `name`; returns its source and the dequantized weight of every fp8 tensor."""
    method, layout, static = LAYOUTS[name]
    _tiny_hf().save_pretrained(folder)
    tensors = load_file(folder / "model.safetensors")
    expected = {}
    for key in [k for k in tensors if any(f".{n}.weight" in k for n in LINEAR_NAMES)]:
        q, s, expected[key] = _quantize(tensors[key], layout)
        base = key.removesuffix("weight")
        if layout == "block":
            tensors[base + "weight_scale_inv"] = s
        elif method == "compressed-tensors":
            tensors[base + "weight_scale"] = s.reshape(1) if layout == "tensor" else s.reshape(-1, 1)
        else:
            tensors[base + "weight_scale"] = s  # [] per tensor (vLLM's AutoFP8 layout), [N] per channel
        if static:
            tensors[base + "input_scale"] = torch.rand(1 if method == "compressed-tensors" else ()) + 0.01
        tensors[key] = q
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = _quantization_config(method, layout, static)
    (folder / "config.json").write_text(json.dumps(config))
    return ModelSource("hf_dir", folder, "tiny"), expected


def _linear_weights(model) -> dict[str, torch.Tensor]:
    """Each fp8 linear layer's dequantized weight, split back into its checkpoint tensors."""
    out = {}
    for _role, module, names in model.linear_sources():
        if module is None:
            continue
        w = module.packed.dequantize() if module.packed is not None else module.weight
        attn = model.layers[0].self_attn
        sizes = {1: [w.shape[0]], 2: [w.shape[0] // 2] * 2, 3: [attn.q_size, attn.kv_size, attn.kv_size]}
        out.update(zip(names, w.split(sizes[len(names)]), strict=True))
    return out


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_an_fp8_checkpoint_loads_to_exactly_its_weights_and_near_the_dense_logits(
    name, tmp_path, paged_runner
):
    source, expected = _write_fp8_checkpoint(tmp_path, name)
    config = json.loads((tmp_path / "config.json").read_text())
    assert resolve_quantization(None, "safetensors", "cpu", 1, config) == "fp8"  # picked up by itself
    model = _load(source, quantization="fp8")
    assert all(isinstance(m.packed, Fp8Weight) for m in model.modules() if isinstance(m, Linear))
    ours = _linear_weights(model)
    assert ours.keys() == expected.keys()
    for key, w in expected.items():
        assert torch.equal(ours[key], w), key
    # --quantization none: the same weights, dequantized into the dense model
    dense_from_fp8 = _load(source, quantization=None)
    assert all(m.packed is None for m in dense_from_fp8.modules() if isinstance(m, Linear))
    for key, w in _linear_weights(dense_from_fp8).items():
        assert torch.equal(w, expected[key]), key
    # against the model the checkpoint was quantized from
    _tiny_hf().save_pretrained(tmp_path / "dense")
    dense = _load(ModelSource("hf_dir", tmp_path / "dense", "tiny"))
    prompt = list(range(3, 60))
    ref, got = _logits(dense, prompt, paged_runner), _logits(model, prompt, paged_runner)
    assert float((got - ref).abs().max()) <= TINY_LOGIT_REL_TOL * float(ref.abs().max())


# --- refusals ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("quantization_config", "field"),
    [
        (
            {"quant_method": "awq", "bits": 4},
            "quant_method 'awq' is not supported; pdserve serves fp8 and gguf",
        ),
        ({"quant_method": "fp8", "activation_scheme": "sometimes"}, "activation_scheme"),
        ({"quant_method": "fp8", "weight_block_size": [128]}, "weight_block_size"),
        (
            {"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "static"},
            "activation_scheme",
        ),
        ({"quant_method": "fp8", "weight_block_size": [128, 128], "scale_fmt": "ue8m0"}, "scale_fmt"),
        (
            {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": {}}},
            "format",
        ),
        ({"quant_method": "compressed-tensors", "config_groups": {}}, "config_groups"),
        (
            _quantization_config("compressed-tensors", "channel", False)
            | {"kv_cache_scheme": {"type": "float", "num_bits": 8}},
            "kv_cache_scheme",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_an_unsupported_quantization_config_is_refused_at_start_naming_the_field(quantization_config, field):
    with pytest.raises(ValueError, match=f"quantization_config.*{field}") as err:
        resolve_quantization(None, "safetensors", "cuda", 1, {"quantization_config": quantization_config})
    assert "config.json" in str(err.value)


def test_compressed_tensors_groups_other_than_fp8_are_refused_naming_the_group_field():
    qc = _quantization_config("compressed-tensors", "channel", False)
    qc["config_groups"]["group_0"]["weights"] |= {"type": "int", "num_bits": 4}
    with pytest.raises(ValueError, match=r"config_groups\.group_0\.weights is 'int' with 4 bits"):
        checkpoint_fp8_scheme({"quantization_config": qc})
    qc["config_groups"]["group_0"]["weights"] |= {"type": "float", "num_bits": 8, "strategy": "group"}
    with pytest.raises(ValueError, match=r"group_0\.weights\.strategy 'group'"):
        checkpoint_fp8_scheme({"quantization_config": qc})


@pytest.mark.parametrize(
    ("name", "drop", "message"),
    [
        (
            "fp8-per-channel",
            "model.layers.1.self_attn.k_proj.weight_scale",
            r"k_proj\.weight is fp8 but .*k_proj\.weight_scale",
        ),
        ("fp8-block", "model.layers.0.mlp.up_proj.weight_scale_inv", r"up_proj\.weight_scale_inv"),
        (
            "compressed-tensors-per-tensor-static",
            "model.layers.0.mlp.down_proj.input_scale",
            r"down_proj\.input_scale",
        ),
    ],
)
def test_a_checkpoint_missing_a_scale_is_refused_naming_the_tensor(name, drop, message, tmp_path):
    source, _ = _write_fp8_checkpoint(tmp_path, name)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors[drop]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=message):
        _load(source, quantization="fp8")


def test_a_scale_of_the_wrong_shape_is_refused_naming_the_tensor(tmp_path):
    source, _ = _write_fp8_checkpoint(tmp_path, "fp8-per-channel")
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.0.self_attn.o_proj.weight_scale"] = torch.ones(3)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"o_proj\.weight_scale has shape \(3,\)"):
        _load(source, quantization="fp8")


def test_fp8_refuses_tensor_parallelism_and_none_keeps_dense_weights():
    with pytest.raises(ValueError, match="tensor-parallel-size"):
        resolve_quantization("fp8", "safetensors", "cuda", 2)
    assert resolve_quantization("fp8", "gguf", "cpu", 1) == "fp8"
    assert resolve_quantization("fp8", "dummy", "cuda", 1) == "fp8"
    fp8_checkpoint = {"quantization_config": {"quant_method": "fp8"}}
    assert resolve_quantization("none", "safetensors", "cuda", 1, fp8_checkpoint) is None
    assert resolve_quantization(None, "safetensors", "cuda", 1, {}) is None


# --- which path multiplies -----------------------------------------------------------


def test_with_the_triton_switch_on_a_cpu_weight_still_multiplies_its_dequantized_copy(monkeypatch):
    monkeypatch.setattr(fp8_weights, "USE_TRITON_FP8_SMALL_M", True)
    fp8 = Fp8Weight.quantize(torch.randn(32, 64, generator=torch.Generator().manual_seed(4)), torch.float32)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(5))
    assert fp8.small_m_kernels(x) is None
    assert torch.allclose(fp8.matmul(x), x @ fp8.dequantize().T, atol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the gpu test below runs the real dispatch")
def test_the_triton_switch_sends_at_most_16_rows_of_a_scaled_mm_weight_to_the_fp8_kernel(monkeypatch):
    from common.models import triton_layers

    # a weight as a GPU of compute capability 8.9 holds it (the _scaled_mm operands, no dense
    # copy), and the Triton kernels as on CUDA, run here in the interpreter with fixed tiles
    g = torch.Generator().manual_seed(6)
    quantized = Fp8Weight.quantize(torch.randn(40, 72, generator=g))
    fp8 = Fp8Weight(quantized.weight, quantized.scale, input_scale=torch.tensor(0.01), prepare=False)
    fp8._scale_row = fp8.scale.view(1, -1)
    config = {"BLOCK_N": 16, "BLOCK_K": 32}
    on_cuda = SimpleNamespace(
        small_m_matmul=functools.partial(triton_layers.small_m_matmul, config=config),
        small_m_matmul_fits=triton_layers.small_m_matmul_fits,
    )
    monkeypatch.setattr(fp8_weights, "cuda_layer_kernels", lambda x: on_cuda)
    scaled_mm_rows = []
    monkeypatch.setattr(
        Fp8Weight, "_scaled_matmul", lambda self, rows: scaled_mm_rows.append(len(rows)) or rows[:, :40]
    )
    x = torch.randn(3, 5, 72, generator=g, dtype=torch.float32).half()
    monkeypatch.setattr(fp8_weights, "USE_TRITON_FP8_SMALL_M", False)
    fp8.matmul(x)
    assert scaled_mm_rows == [15]  # the switch off: _scaled_mm at any size

    monkeypatch.setattr(fp8_weights, "USE_TRITON_FP8_SMALL_M", True)
    y = fp8.matmul(x)  # 15 rows; the static input scale plays no part in a weight-only product
    assert scaled_mm_rows == [15] and y.shape == (3, 5, 40) and y.dtype == torch.float16
    expected = x.double() @ fp8.dequantize(torch.float64).T
    assert float((y.double() - expected).norm() / expected.norm()) < 2e-3
    fp8.matmul(torch.zeros(17, 72, dtype=torch.float16))
    assert scaled_mm_rows == [15, 17]


# --- the GPU GEMM --------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("static", [False, True], ids=["per-token", "static-input"])
@pytest.mark.parametrize("rows", [1, 16, 200])
def test_scaled_mm_on_the_gpu_matches_the_dequantized_weight(static, rows):
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(512, 1024, device="cuda", generator=g) * 0.05
    x = torch.randn(rows, 1024, device="cuda", generator=g).bfloat16()
    quantized = Fp8Weight.quantize(w, torch.bfloat16)
    input_scale = x.float().abs().max() / FP8_MAX if static else None
    fp8 = Fp8Weight(quantized.weight, quantized.scale, input_scale=input_scale, compute_dtype=torch.bfloat16)
    assert fp8._scale_row is not None and fp8._dense is None  # the _scaled_mm path, not the fallback
    y = fp8.matmul(x)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, 512)
    ref = x.float() @ fp8.dequantize().T
    # the activations' own fp8 rounding (3 mantissa bits) over K = 1024 products
    assert float((y.float() - ref).norm() / ref.norm()) < 0.05


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 16])
def test_the_triton_fp8_small_m_path_on_the_gpu_matches_the_dequantized_weight(rows, monkeypatch):
    monkeypatch.setattr(fp8_weights, "USE_TRITON_FP8_SMALL_M", True)
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(4096, 1024, device="cuda", generator=g) * 0.05
    x = torch.randn(rows, 1024, device="cuda", generator=g).bfloat16()
    fp8 = Fp8Weight.quantize(w, torch.bfloat16)
    assert fp8.small_m_kernels(x) is not None  # the Triton path, not _scaled_mm
    y = fp8.matmul(x)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, 4096)
    ref = x.double() @ fp8.dequantize(torch.float64).T
    # bf16 activations and a bf16 result: no activation rounding to fp8, unlike _scaled_mm
    assert float((y.double() - ref).norm() / ref.norm()) < 1e-2
