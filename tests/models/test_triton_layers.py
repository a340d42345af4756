"""The Triton layer kernels (RMSNorm with residual, RoPE, SiLU-and-mul, small-M matmul) against torch.

Compiled on a CUDA device; on CPU in Triton's interpreter (switched on by conftest.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from common.models import triton_layers as kernels
from common.models.fp8_weights import quantize_rows
from common.models.layers import RMSNorm, RotaryEmbedding

DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
# the interpreter computes in numpy, which has no bf16
DTYPES = (
    [torch.float32, torch.float16, torch.bfloat16]
    if DEVICE.type == "cuda"
    else [torch.float32, torch.float16]
)
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    err = ((actual.float() - expected.float()).norm() / expected.float().norm()).item()
    assert err < TOL[dtype], f"relative error {err:.2e}"


def _randn(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 576, 100])
def test_rms_norm_matches_the_torch_module(dtype, hidden):
    norm = RMSNorm(hidden, 1e-5).to(DEVICE, dtype)
    norm.weight.copy_(_randn(hidden, dtype=dtype, seed=1))
    x = _randn(5, hidden, dtype=dtype, seed=2) * 3
    _close(kernels.rms_norm(x, norm.weight, norm.eps), norm._norm(x), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_with_residual_normalizes_the_sum_and_stores_it_in_the_residual(dtype):
    norm = RMSNorm(96, 1e-6).to(DEVICE, dtype)
    x = _randn(7, 96, dtype=dtype, seed=3)
    residual = _randn(7, 96, dtype=dtype, seed=4)
    expected_sum = x + residual
    out = kernels.rms_norm(x, norm.weight, norm.eps, residual)
    assert torch.equal(residual, expected_sum)  # one rounding of the sum, like torch's add
    _close(out, norm._norm(expected_sum), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(4, 2, 32), (9, 3, 64), (3, 1, 24)])
def test_rotary_in_place_matches_the_torch_module_on_views_of_a_fused_qkv(dtype, heads):
    num_q, num_kv, head_dim = heads
    rotary = RotaryEmbedding(head_dim, 512, 10000.0, None).to(DEVICE)
    tokens = 6
    qkv = _randn(tokens, (num_q + 2 * num_kv) * head_dim, dtype=dtype, seed=5)
    positions = torch.tensor([0, 1, 7, 100, 311, 511], device=DEVICE)

    def split(t):
        q, k, v = t.split([num_q * head_dim, num_kv * head_dim, num_kv * head_dim], dim=-1)
        return q.view(tokens, num_q, head_dim), k.view(tokens, num_kv, head_dim), v

    q, k, _ = split(qkv.clone())
    with torch.no_grad():
        cos = rotary.cos[positions].to(dtype).unsqueeze(1)
        sin = rotary.sin[positions].to(dtype).unsqueeze(1)

        def rotate(x):
            x1, x2 = x.chunk(2, dim=-1)
            return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

        expected_q, expected_k = rotate(q), rotate(k)
    fused = qkv.clone()
    fq, fk, fv = split(fused)
    out_q, out_k = kernels.rotary_(positions, fq, fk, rotary.cos, rotary.sin)
    assert out_q.data_ptr() == fq.data_ptr() and out_k.data_ptr() == fk.data_ptr()
    _close(fq, expected_q, dtype)
    _close(fk, expected_k, dtype)
    assert torch.equal(fv, split(qkv)[2])  # V is untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [64, 1536, 3000])
def test_silu_and_mul_matches_torch(dtype, width):
    x = _randn(3, 2 * width, dtype=dtype, seed=6) * 4
    gate, up = x.split(width, dim=-1)
    _close(kernels.silu_and_mul(x), F.silu(gate) * up, dtype)


MATMUL_DTYPES = [torch.float16, torch.bfloat16] if DEVICE.type == "cuda" else [torch.float16]
# on CPU the interpreter cannot time configs: one is given
MATMUL_CONFIG = None if DEVICE.type == "cuda" else {"BLOCK_N": 16, "BLOCK_K": 32}


@pytest.mark.parametrize("dtype", MATMUL_DTYPES)
@pytest.mark.parametrize("m, n, k", [(1, 96, 64), (3, 50, 200), (16, 64, 48)])
def test_small_m_matmul_matches_f_linear(dtype, m, n, k):
    x = _randn(m, k, dtype=dtype, seed=7)
    w = _randn(n, k, dtype=dtype, seed=8)
    y = kernels.small_m_matmul(x, w, config=MATMUL_CONFIG)
    assert y.shape == (m, n) and y.dtype == dtype
    _close(y, (x.float() @ w.float().T), dtype)


@pytest.mark.parametrize("dtype", MATMUL_DTYPES)
@pytest.mark.parametrize("m, n, k", [(1, 96, 64), (5, 40, 100)])
def test_small_m_matmul_with_the_norm_folded_in_matches_rms_norm_then_linear(dtype, m, n, k):
    norm = RMSNorm(k, 1e-5).to(DEVICE, dtype)
    norm.weight.copy_(_randn(k, dtype=dtype, seed=9).abs() + 0.5)
    x = _randn(m, k, dtype=dtype, seed=10) * 3
    w = _randn(n, k, dtype=dtype, seed=11)
    y = kernels.small_m_matmul(x, w, config=MATMUL_CONFIG, norm_weight=norm.weight, eps=norm.eps)
    _close(y, norm._norm(x).float() @ w.float().T, dtype)


@pytest.mark.parametrize("dtype", MATMUL_DTYPES)
def test_small_m_matmul_with_silu_and_mul_folded_in_matches_the_mlp_tail(dtype):
    gate_up = _randn(3, 2 * 72, dtype=dtype, seed=12) * 2
    w = _randn(48, 72, dtype=dtype, seed=13)
    y = kernels.small_m_matmul(gate_up, w, config=MATMUL_CONFIG, silu_mul=True)
    gate, up = gate_up.split(72, dim=-1)
    _close(y, (F.silu(gate) * up).float() @ w.float().T, dtype)
    with pytest.raises(ValueError, match="144"):
        kernels.small_m_matmul(gate, w, config=MATMUL_CONFIG, silu_mul=True)


@pytest.mark.parametrize("dtype", MATMUL_DTYPES)
def test_small_m_matmul_into_out_adds_to_the_residual_in_place(dtype):
    x = _randn(4, 64, dtype=dtype, seed=14)
    w = _randn(80, 64, dtype=dtype, seed=15)
    residual = _randn(4, 80, dtype=dtype, seed=16)
    expected = (x @ w.T) + residual  # the product rounded, then the sum, as torch rounds them
    out = residual.clone()
    y = kernels.small_m_matmul(x, w, config=MATMUL_CONFIG, out=out)
    assert y.data_ptr() == out.data_ptr()
    _close(out, expected, dtype)
    with pytest.raises(ValueError, match="out must be"):
        kernels.small_m_matmul(x, w, config=MATMUL_CONFIG, out=residual[:, :40])


@pytest.mark.parametrize("dtype", MATMUL_DTYPES)
@pytest.mark.parametrize("m", [1, 3, 16])
def test_silu_in_the_gate_up_epilogue_gives_the_bits_of_matmul_then_silu_and_mul(dtype, m):
    # I = 37 is no multiple of BLOCK_N (16), K = 100 none of BLOCK_K (32)
    inter, k = 37, 100
    x = _randn(m, k, dtype=dtype, seed=20) * 2
    w = _randn(2 * inter, k, dtype=dtype, seed=21) * 0.3
    config = MATMUL_CONFIG or {"BLOCK_N": 16, "BLOCK_K": 32}  # the same tiles for both paths
    fused = kernels.small_m_matmul(x, w, config=config, gate_up_silu=True)
    unfused = kernels.silu_and_mul(kernels.small_m_matmul(x, w, config=config))
    assert fused.shape == (m, inter) and fused.dtype == dtype
    assert torch.equal(fused, unfused)
    gate, up = (x.float() @ w.float().T).to(dtype).split(inter, dim=-1)
    _close(fused, F.silu(gate) * up, dtype)


@pytest.mark.parametrize("dtype", MATMUL_DTYPES)
def test_silu_in_the_gate_up_epilogue_with_the_norm_folded_in_gives_the_bits_of_the_unfused_pair(dtype):
    inter, k = 24, 80
    norm = RMSNorm(k, 1e-5).to(DEVICE, dtype)
    norm.weight.copy_(_randn(k, dtype=dtype, seed=22).abs() + 0.5)
    x = _randn(5, k, dtype=dtype, seed=23) * 3
    w = _randn(2 * inter, k, dtype=dtype, seed=24) * 0.2
    config = MATMUL_CONFIG or {"BLOCK_N": 16, "BLOCK_K": 32}
    folded = {"norm_weight": norm.weight, "eps": norm.eps}
    fused = kernels.small_m_matmul(x, w, config=config, gate_up_silu=True, **folded)
    unfused = kernels.silu_and_mul(kernels.small_m_matmul(x, w, config=config, **folded))
    assert torch.equal(fused, unfused)


def test_silu_in_the_gate_up_epilogue_refuses_what_it_would_misread():
    x = torch.zeros(2, 32, device=DEVICE, dtype=torch.float16)
    config = MATMUL_CONFIG or {"BLOCK_N": 16, "BLOCK_K": 32}
    with pytest.raises(ValueError, match="odd number of rows"):
        kernels.small_m_matmul(
            x, torch.zeros(9, 32, device=DEVICE, dtype=torch.float16), config, gate_up_silu=True
        )
    w = torch.zeros(8, 32, device=DEVICE, dtype=torch.float16)
    with pytest.raises(ValueError, match="neither silu_mul nor out"):
        kernels.small_m_matmul(
            x, w, config, gate_up_silu=True, out=torch.zeros(2, 4, device=DEVICE, dtype=x.dtype)
        )
    with pytest.raises(ValueError, match="neither silu_mul nor out"):
        kernels.small_m_matmul(
            torch.zeros(2, 64, device=DEVICE, dtype=x.dtype), w, config, gate_up_silu=True, silu_mul=True
        )
    with pytest.raises(ValueError, match="M <= 16"):
        kernels.small_m_matmul(
            torch.zeros(17, 32, device=DEVICE, dtype=x.dtype), w, config, gate_up_silu=True
        )
    with pytest.raises(ValueError, match="weight \\[N, 32\\]"):
        kernels.small_m_matmul(torch.zeros(2, 48, device=DEVICE, dtype=x.dtype), w, config, gate_up_silu=True)


@pytest.mark.parametrize("rows, folds", [(3, True), (16, True), (17, False)])
def test_the_mlp_folds_silu_into_gate_up_for_a_small_batch_and_keeps_the_bits(monkeypatch, rows, folds):
    """GatedMLP with the CUDA kernels (here interpreted on CPU): a batch of at most 16 rows
    runs the gate_up matmul with SiLU-and-mul in its epilogue, a larger one the matmul and the
    SiLU-and-mul kernel; the switch off gives the same bits."""
    import types

    from common.models import layers

    dtype = torch.float16
    config = MATMUL_CONFIG or {"BLOCK_N": 16, "BLOCK_K": 32}
    calls = []

    def small_m_matmul(x, weight, **kw):
        calls.append(kw.get("gate_up_silu", False))
        return kernels.small_m_matmul(x, weight, config=config, **kw)

    def silu_and_mul(x):
        calls.append("silu_and_mul")
        return kernels.silu_and_mul(x)

    interpreted = types.SimpleNamespace(
        small_m_matmul=small_m_matmul,
        small_m_matmul_fits=kernels.small_m_matmul_fits,
        silu_and_mul=silu_and_mul,
    )
    monkeypatch.setattr(layers, "_cuda_kernels", lambda x: interpreted)
    monkeypatch.setattr(layers, "FUSE_SILU_INTO_GATE_UP", True)
    mlp = layers.GatedMLP(48, 40).to(DEVICE, dtype)
    with torch.no_grad():
        mlp.gate_up_proj.weight.copy_(_randn(80, 48, dtype=dtype, seed=25) * 0.3)
        mlp.down_proj.weight.copy_(_randn(48, 40, dtype=dtype, seed=26) * 0.3)
    x = _randn(rows, 48, dtype=dtype, seed=27)
    fused = mlp(x)
    assert calls == ([True, False] if folds else ["silu_and_mul"])
    monkeypatch.setattr(layers, "FUSE_SILU_INTO_GATE_UP", False)
    calls.clear()
    unfused = mlp(x)
    assert calls == ([False, "silu_and_mul", False] if folds else ["silu_and_mul"])
    assert torch.equal(fused, unfused)


@pytest.mark.parametrize("cache_dtype", [None, torch.float8_e4m3fn])
@pytest.mark.parametrize("heads", [(4, 2, 32), (9, 3, 64)])
def test_rotary_write_kv_equals_rotary_then_write_kv(heads, cache_dtype):
    # against the Triton write_kv (itself checked against the reference in tests/attention):
    # the interpreter's fp8 rounding differs from torch's where a value rounds up to a power of 2
    from common.attention.triton_write_kv import write_kv

    dtype = torch.float16
    num_q, num_kv, head_dim = heads
    rotary = RotaryEmbedding(head_dim, 512, 10000.0, None).to(DEVICE)
    tokens, block_size = 5, 4
    qkv = _randn(tokens, (num_q + 2 * num_kv) * head_dim, dtype=dtype, seed=17)
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
    if cache_dtype is not None:
        cache = cache.to(cache_dtype)
    scale = 0.5 if cache_dtype is not None else 1.0
    eq, ek, ev = split(qkv.clone())
    expected_q, expected_k = kernels.rotary_(positions, eq, ek, rotary.cos, rotary.sin)
    expected_cache = cache.clone()
    write_kv(expected_k, ev, expected_cache, 1, slots, scale, scale)
    q, k, v = split(qkv.clone())
    got_cache = cache.clone()
    kernels.rotary_write_kv(positions, q, k, v, rotary.cos, rotary.sin, got_cache, 1, slots, scale, scale)
    assert torch.equal(q, expected_q)
    assert torch.equal(got_cache.view(torch.uint8), expected_cache.view(torch.uint8))


def test_small_m_matmul_takes_only_few_rows_of_a_16_bit_dtype():
    w = torch.zeros(8, 32, device=DEVICE, dtype=torch.float16)
    assert kernels.small_m_matmul_fits(torch.zeros(16, 32, device=DEVICE, dtype=torch.float16), w)
    assert not kernels.small_m_matmul_fits(torch.zeros(17, 32, device=DEVICE, dtype=torch.float16), w)
    assert not kernels.small_m_matmul_fits(torch.zeros(2, 32, device=DEVICE), w.float())
    with pytest.raises(ValueError, match="M <= 16"):
        kernels.small_m_matmul(torch.zeros(17, 32, device=DEVICE, dtype=torch.float16), w)


# fp8 weights (float8_e4m3fn [N, K], fp32 row scales [N]); the interpreter's dot is wrong on
# bf16, so on CPU the activations are fp32 and fp16
FP8_X_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])


def _fp8_weight(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row magnitudes spread over two decades, so a scale applied to the wrong row shows."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.logspace(-2, 0, n)[:, None]
    q, scale = quantize_rows(w)
    return q.to(DEVICE), scale.to(DEVICE)


@pytest.mark.parametrize("dtype", FP8_X_DTYPES)
@pytest.mark.parametrize("m, n, k", [(1, 40, 72), (3, 50, 200), (16, 33, 48)])
def test_small_m_matmul_of_an_fp8_weight_is_x_times_its_dequantized_rows(dtype, m, n, k):
    x = _randn(m, k, dtype=dtype, seed=20)
    q, scale = _fp8_weight(n, k, seed=21)
    y = kernels.small_m_matmul(x, q, config=MATMUL_CONFIG, weight_scale=scale)
    assert y.shape == (m, n) and y.dtype == dtype
    expected = x.double() @ (q.double() * scale.double()[:, None]).T
    _close(y, expected, dtype)


def test_silu_in_the_gate_up_epilogue_of_an_fp8_weight_scales_the_up_rows_by_their_own_scales():
    x = _randn(3, 48, dtype=torch.float16, seed=22)
    q, scale = _fp8_weight(2 * 40, 48, seed=23)
    config = MATMUL_CONFIG or {"BLOCK_N": 16, "BLOCK_K": 32}
    fused = kernels.small_m_matmul(x, q, config=config, gate_up_silu=True, weight_scale=scale)
    unfused = kernels.silu_and_mul(kernels.small_m_matmul(x, q, config=config, weight_scale=scale))
    assert torch.equal(fused, unfused)


def test_an_fp8_weight_needs_its_row_scales_and_a_16_bit_one_takes_none():
    x = torch.zeros(2, 32, device=DEVICE, dtype=torch.float16)
    q, scale = _fp8_weight(8, 32, seed=24)
    assert kernels.small_m_matmul_fits(x.float(), q)  # fp8 weights take fp32 activations too
    assert not kernels.small_m_matmul_fits(torch.zeros(17, 32, device=DEVICE), q)
    with pytest.raises(ValueError, match="needs weight_scale"):
        kernels.small_m_matmul(x, q, MATMUL_CONFIG)
    with pytest.raises(ValueError, match="float16 weight with weight_scale"):
        kernels.small_m_matmul(x, torch.zeros_like(q, dtype=x.dtype), MATMUL_CONFIG, weight_scale=scale)
    with pytest.raises(ValueError, match=r"contiguous fp32 \[8\].*got \(4,\)"):
        kernels.small_m_matmul(x, q, MATMUL_CONFIG, weight_scale=scale[:4])
    with pytest.raises(ValueError, match="torch.float16 on"):
        kernels.small_m_matmul(x, q, MATMUL_CONFIG, weight_scale=scale.half())


def test_kernels_refuse_layouts_they_would_misread():
    with pytest.raises(ValueError, match="rows"):
        kernels.rms_norm(torch.zeros(2, 3, 4, device=DEVICE), torch.ones(4, device=DEVICE), 1e-5)
    with pytest.raises(ValueError, match="2 \\* n"):
        kernels.silu_and_mul(torch.zeros(2, 5, device=DEVICE))


def _tiny_model(device: str, dtype: torch.dtype):
    from common.attention.backend_select import get_attention_backend
    from common.models.llama import LlamaForCausalLM
    from tests.tiny_llama import tiny_config

    config = tiny_config(
        vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=8,
        head_dim=32,
    )  # fmt: skip
    with torch.device(device):
        model = LlamaForCausalLM(config, get_attention_backend(device)).to(dtype)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.endswith("norm.weight"):
                param.normal_(0.0, 0.05, generator=generator)
    return model


def _tiny_logits(model, device: str, dtype: torch.dtype, lengths: tuple[int, int]) -> torch.Tensor:
    """Logits of one step of two requests (prefill of `lengths` tokens) through a paged cache."""
    from common.engine.model_runner import ModelRunner
    from common.engine.request import Request
    from common.engine.scheduled_batch import ScheduledBatch
    from common.sampling_params import SamplingParams

    runner = ModelRunner(
        model, model.config, num_blocks=8, block_size=16, kv_cache_dtype="auto", device=device,
        dtype=dtype, enforce_eager=True,
    )  # fmt: skip
    a, b = lengths
    requests = [
        Request("a", list(range(3, 3 + a)), SamplingParams(temperature=0.0)),
        Request("b", list(range(50, 50 + b)), SamplingParams(temperature=0.0)),
    ]
    with torch.inference_mode():
        inputs = runner.prepare_inputs(ScheduledBatch(requests, [a, b], [[1, 2, 3], [5]]))
        hidden = model(inputs.input_ids, inputs.positions, runner.kv_cache, inputs.attn_metadata)
        return model.compute_logits(hidden)


@pytest.mark.parametrize("fuse_norm", [True, False])
@pytest.mark.parametrize("silu_in", ["gate_up_epilogue", "down_operand", "own_kernel"])
def test_the_fused_small_batch_layer_matches_the_general_path(monkeypatch, fuse_norm, silu_in):
    """Norms folded into the matmuls, RoPE into the K/V write, SiLU into the gate_up matmul's
    epilogue or the down projection's operand, residual adds into the projections: same
    logits as the layer-by-layer path (fp16, the kernels interpreted on CPU, compiled on CUDA)."""
    import functools
    import types

    from common.models import layers
    from common.models.llama import LlamaForCausalLM

    monkeypatch.setattr(layers, "FUSE_NORM_INTO_MATMUL", fuse_norm)
    monkeypatch.setattr(layers, "FUSE_SILU_INTO_GATE_UP", silu_in == "gate_up_epilogue")
    monkeypatch.setattr(layers, "FUSE_SILU_INTO_MATMUL", silu_in == "down_operand")
    device = DEVICE.type
    model = _tiny_model(device, torch.float16)
    plain = _tiny_logits(model, device, torch.float16, (3, 2))
    interpreted = types.SimpleNamespace(
        small_m_matmul=functools.partial(kernels.small_m_matmul, config=MATMUL_CONFIG),
        rotary_write_kv=kernels.rotary_write_kv,
        rms_norm=kernels.rms_norm,
        silu_and_mul=kernels.silu_and_mul,
    )
    used = []

    def fused_kernels(self, x):
        used.append(x.shape[0])
        return interpreted

    monkeypatch.setattr(LlamaForCausalLM, "_small_batch_kernels", fused_kernels)
    fused = _tiny_logits(model, device, torch.float16, (3, 2))
    assert used == [5]
    _close(fused, plain, torch.float16)


def _fp8_packed(model, on_scaled_mm: bool):
    """Every Linear of `model` served from per-row fp8 (Fp8Weight), as a GPU of compute
    capability 8.9 holds it when `on_scaled_mm` (the _scaled_mm operands, no dense copy); a
    twin of the model with each weight replaced by its dequantized fp8 values as the reference."""
    import copy

    from common.models.fp8_weights import Fp8Weight
    from common.models.layers import Linear

    dense = copy.deepcopy(model)
    for module, twin in zip(model.modules(), dense.modules(), strict=True):
        if not isinstance(module, Linear):
            continue
        quantized = Fp8Weight.quantize(module.weight.float(), module.weight.dtype)
        fp8 = Fp8Weight(quantized.weight, quantized.scale, compute_dtype=module.weight.dtype, prepare=False)
        if on_scaled_mm:
            fp8._scale_row = fp8.scale.view(1, -1)
        else:
            fp8._dense = fp8.dequantize(module.weight.dtype)
        with torch.no_grad():
            twin.weight.copy_(fp8.dequantize(module.weight.dtype))
        module.keep_packed(fp8)
    return dense


@pytest.mark.parametrize("switch", [True, False], ids=["triton-fp8", "switch-off"])
def test_the_fused_small_batch_layer_serves_fp8_weights_through_the_small_m_kernel(monkeypatch, switch):
    """fp8 Linears (USE_TRITON_FP8_SMALL_M on) keep the fused small-batch layer under
    USE_FUSED_SMALL_BATCH, their fp8 tiles and row scales fed to the small-M matmul beside the
    norm, SiLU and residual fusions: the logits of the dense model holding the dequantized
    weights. With either switch off, or a weight that is not on _scaled_mm's operands, the
    layer is not taken."""
    import functools
    import types

    from common.models import fp8_weights, layers
    from common.models.llama import LlamaForCausalLM

    monkeypatch.setattr(fp8_weights, "USE_TRITON_FP8_SMALL_M", switch)
    device = DEVICE.type
    model = _tiny_model(device, torch.float16)
    dense = _fp8_packed(model, on_scaled_mm=True)
    plain = _tiny_logits(dense, device, torch.float16, (3, 2))
    interpreted = types.SimpleNamespace(
        small_m_matmul=functools.partial(kernels.small_m_matmul, config=MATMUL_CONFIG),
        small_m_matmul_fits=kernels.small_m_matmul_fits,
        rotary_write_kv=kernels.rotary_write_kv,
        rms_norm=kernels.rms_norm,
        silu_and_mul=kernels.silu_and_mul,
    )
    monkeypatch.setattr(layers, "_cuda_kernels", lambda x: interpreted if x.shape[0] <= 16 else None)
    monkeypatch.setattr(layers, "USE_FUSED_SMALL_BATCH", True)  # fp8 Linears take it only under this
    monkeypatch.setattr(fp8_weights, "cuda_layer_kernels", lambda x: interpreted)
    taken = []
    real_layer = type(model.layers[0]).forward_small_batch

    def counted(self, *args):
        taken.append(self)
        return real_layer(self, *args)

    monkeypatch.setattr(type(model.layers[0]), "forward_small_batch", counted)
    if not switch:
        assert LlamaForCausalLM._small_batch_kernels(model, torch.zeros(5, 256, dtype=torch.float16)) is None
        return
    fused = _tiny_logits(model, device, torch.float16, (3, 2))
    assert len(taken) == 3  # every layer took the fused path
    _close(fused, plain, torch.float16)
    on_dense = _tiny_model(device, torch.float16)
    _fp8_packed(on_dense, on_scaled_mm=False)  # a dequantized copy (the CPU's form): general path
    assert LlamaForCausalLM._small_batch_kernels(on_dense, torch.zeros(5, 256, dtype=torch.float16)) is None
    monkeypatch.setattr(layers, "USE_FUSED_SMALL_BATCH", False)
    assert LlamaForCausalLM._small_batch_kernels(model, torch.zeros(5, 256, dtype=torch.float16)) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lengths", [(37, 11), (3, 2)])  # 48 tokens: cuBLAS; 5: the fused small batch
def test_a_model_with_the_kernels_matches_it_with_plain_torch_ops(dtype, lengths, monkeypatch):
    from common.models import layers

    model = _tiny_model("cuda", dtype)
    monkeypatch.setattr(layers, "USE_FUSED_SMALL_BATCH", True)
    fused = _tiny_logits(model, "cuda", dtype, lengths)
    monkeypatch.setattr(layers, "USE_FUSED_SMALL_BATCH", False)
    unfused = _tiny_logits(model, "cuda", dtype, lengths)
    monkeypatch.setattr(layers, "USE_TRITON_KERNELS", False)
    plain = _tiny_logits(model, "cuda", dtype, lengths)
    _close(unfused, plain, torch.bfloat16)
    _close(fused, plain, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 16])
def test_silu_in_the_gate_up_epilogue_at_llama_3_8b_shapes_equals_the_unfused_pair(dtype, m):
    """Llama-3-8B's gate_up weight [2 x 14336, 4096]: under a pinned tile config the fused
    kernel gives the unfused pair's bits; autotuned (each its own tiles) both stay close to
    torch's matmul then SiLU-and-mul."""
    inter, k = 14336, 4096
    x = _randn(m, k, dtype=dtype, seed=30)
    w = _randn(2 * inter, k, dtype=dtype, seed=31) * 0.02
    pinned = [
        {"BLOCK_N": 16, "BLOCK_K": 256, "num_warps": 4, "num_stages": 4},
        {"BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4, "num_stages": 6},
    ]
    for config in pinned:
        fused = kernels.small_m_matmul(x, w, config=config, gate_up_silu=True)
        unfused = kernels.silu_and_mul(kernels.small_m_matmul(x, w, config=config))
        assert torch.equal(fused, unfused), config
    gate, up = F.linear(x, w).split(inter, dim=-1)
    expected = F.silu(gate) * up
    _close(kernels.small_m_matmul(x, w, gate_up_silu=True), expected, dtype)
    _close(kernels.silu_and_mul(kernels.small_m_matmul(x, w)), expected, dtype)


def _decode_step_logits(model, device: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a decode step (after the prompts' prefill) of two requests, and the K/V it
    and the prefill wrote."""
    from common.engine.model_runner import ModelRunner
    from common.engine.request import Request
    from common.engine.scheduled_batch import ScheduledBatch
    from common.sampling_params import SamplingParams

    runner = ModelRunner(
        model, model.config, num_blocks=8, block_size=16, kv_cache_dtype="auto", device=device,
        dtype=dtype, enforce_eager=True,
    )  # fmt: skip
    requests = [
        Request("a", list(range(3, 23)), SamplingParams(temperature=0.0)),
        Request("b", list(range(50, 57)), SamplingParams(temperature=0.0)),
    ]
    blocks = [[1, 2], [5]]
    with torch.inference_mode():
        inputs = runner.prepare_inputs(ScheduledBatch(requests, [20, 7], blocks))
        model(inputs.input_ids, inputs.positions, runner.kv_cache, inputs.attn_metadata)
        for request, n in zip(requests, [20, 7], strict=True):
            request.num_computed_tokens = n
            request.append_output_token(11)
        inputs = runner.prepare_inputs(ScheduledBatch(requests, [1, 1], blocks))
        assert inputs.attn_metadata.is_pure_decode
        hidden = model(inputs.input_ids, inputs.positions, runner.kv_cache, inputs.attn_metadata)
        cache = runner.kv_cache  # the slots written: "a" 21 tokens in blocks 1, 2; "b" 8 in block 5
        written = torch.cat(
            [cache[1].flatten(), cache[2, :, :, :, :5].flatten(), cache[5, :, :, :, :8].flatten()]
        )
        return model.compute_logits(hidden), written


def test_a_decode_step_with_rope_and_the_kv_write_inside_the_decode_kernel_keeps_the_bits(monkeypatch):
    """Through the Triton attention backend and layer kernels (interpreted on CPU, compiled on
    CUDA): a decode step whose decode kernel applies RoPE and writes the new K/V gives the
    logits and cache of the separate rotary_write_kv launch (the same bits on CPU), and both
    match plain torch."""
    import functools
    import types

    from common.attention.triton_backend import TritonAttentionBackend
    from common.models import layers

    device = DEVICE.type
    dtype = torch.float16
    model = _tiny_model(device, dtype)
    monkeypatch.setattr(layers, "USE_TRITON_KERNELS", False)
    plain, plain_cache = _decode_step_logits(model, device, dtype)
    monkeypatch.setattr(layers, "USE_TRITON_KERNELS", True)
    layer_kernels = types.SimpleNamespace(
        small_m_matmul=functools.partial(kernels.small_m_matmul, config=MATMUL_CONFIG),
        small_m_matmul_fits=kernels.small_m_matmul_fits,
        rotary_write_kv=kernels.rotary_write_kv,
        rotary_=kernels.rotary_,
        rms_norm=kernels.rms_norm,
        silu_and_mul=kernels.silu_and_mul,
    )
    monkeypatch.setattr(layers, "_cuda_kernels", lambda x: layer_kernels)
    backend = TritonAttentionBackend(max_model_len=256)
    for layer in model.layers:
        monkeypatch.setattr(layer.self_attn, "backend", backend)
    calls = []
    fused_call = backend.decode_with_new_token
    monkeypatch.setattr(
        backend, "decode_with_new_token", lambda *a, **k: calls.append(1) or fused_call(*a, **k)
    )
    monkeypatch.setattr(layers, "FUSE_ROPE_INTO_DECODE", True)
    fused, fused_cache = _decode_step_logits(model, device, dtype)
    assert len(calls) == len(model.layers)  # the decode step's layers, not the prefill's
    monkeypatch.setattr(layers, "FUSE_ROPE_INTO_DECODE", False)
    unfused, unfused_cache = _decode_step_logits(model, device, dtype)
    assert len(calls) == len(model.layers)
    if device == "cpu":  # interpreted, both RoPE paths round every product as torch does
        assert torch.equal(fused, unfused)
        assert torch.equal(fused_cache, unfused_cache)
    # compiled, rotary_write_kv's products round slightly apart from torch's (docs/benchmarks.md)
    _close(fused, unfused, dtype)
    _close(fused_cache, unfused_cache, dtype)
    _close(fused, plain, dtype)
    _close(fused_cache, plain_cache, dtype)
