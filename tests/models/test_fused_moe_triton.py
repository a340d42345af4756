"""The Triton mixture-of-experts kernels (common/models/fused_moe_triton.py) give the torch
reference's results (fused_moe_reference.fused_moe), both held to a float64 run of the
reference: at tiny shapes, with experts that get no token, every token on one expert, pair
counts that are no multiple of the block, hidden and intermediate sizes that are no multiple
of the K tile, routing weights in fp32 (Mixtral) or the model's dtype (Qwen3-MoE), and fp8
experts against their dequantized weights. The align step is checked on its own: every pair
once, each block one expert's, padding the sentinel.

Without a CUDA device the kernels run in Triton's interpreter, which tests/models/conftest.py
switches on before triton is first imported; should triton have been imported first with the
interpreter off, this module's tests run in a child process with it on instead. fp32 and
fp16 only on CPU: the interpreter's tl.dot is wrong on bf16.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from common.models import fused_moe_triton as kernels
from common.models import moe
from common.models.fp8_weights import FP8, quantize_rows
from common.models.fused_moe_reference import fused_moe as reference
from common.models.fused_moe_reference import select_experts
from tests.lora.lora_op_cases import poisoned, rel_error
from tests.models.interpreter_child import run_in_interpreter_child
from tests.tiny_llama import tiny_hf_config

DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
KERNELS_HERE = DEVICE.type == "cuda" or type(kernels._gate_up_kernel).__name__ == "InterpretedFunction"
in_this_process = pytest.mark.skipif(
    not KERNELS_HERE, reason="triton was imported before its interpreter could be switched on: run in a child"
)

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
# relative error (Frobenius) against the float64 reference
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
HIDDEN, TOP_K = 64, 2
SMALL = kernels.MoeConfig(block_m=16, block_n=32, block_k=32)


if not KERNELS_HERE:  # defined only where it is the way the kernels run, so it never shows as skipped

    def test_kernels_in_a_child_process_with_the_interpreter_on():
        run_in_interpreter_child(__file__)


def experts(num_experts: int, inter: int, hidden: int = HIDDEN, seed: int = 0):
    """x-free expert weights w13 [E, 2I, H], w2 [E, H, I] in float64, scaled so outputs stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=g, dtype=torch.float64) / hidden**0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=g, dtype=torch.float64) / inter**0.5
    return w13.to(DEVICE), w2.to(DEVICE)


def routed(tokens: int, num_experts: int, top_k: int = TOP_K, hidden: int = HIDDEN, seed: int = 1):
    """x [T, H] in float64 and its routing (fp32 weights [T, k], ids [T, k]) by a random router."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g, dtype=torch.float64)
    logits = torch.randn(tokens, num_experts, generator=g)
    weights, ids = select_experts(logits, top_k, renormalize=True)
    return x.to(DEVICE), weights.to(DEVICE), ids.to(DEVICE)


def run(x, w13, w2, weights, ids, dtype, config=SMALL, **scales):
    """The kernels on x and the experts in `dtype` (fp8 experts kept in fp8), unwritten memory NaN."""

    def cast(w):
        return w if w.dtype == FP8 else w.to(dtype)

    return poisoned(
        lambda: kernels.fused_moe(x.to(dtype), cast(w13), cast(w2), weights, ids, config=config, **scales)
    )


def dequantized(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.double() * scales[..., None].double()


# --- the align step ----------------------------------------------------------------------


def check_aligned(aligned: kernels.AlignedPairs, ids: torch.Tensor, num_experts: int) -> None:
    """Every pair exactly once, in expert order and pair order within an expert; each block
    one expert's, each expert's group padded to whole blocks with the sentinel."""
    flat = ids.reshape(-1).cpu()
    n, bm = flat.numel(), aligned.block_m
    total = int(aligned.total)
    counts = torch.bincount(flat, minlength=num_experts)
    assert total == int(((counts + bm - 1) // bm * bm).sum())
    assert aligned.capacity >= total and aligned.capacity % bm == 0
    assert aligned.capacity == -(-kernels.padded_capacity(n, num_experts, bm) // bm) * bm
    sorted_pairs = aligned.sorted_pairs.cpu()
    assert torch.equal(sorted_pairs[total:], torch.full((aligned.capacity - total,), n, dtype=torch.int32))
    used = sorted_pairs[:total]
    real = used[used < n].long()
    assert torch.equal(real.sort().values, torch.arange(n))  # every pair once
    assert torch.equal(real, torch.argsort(flat, stable=True))  # by expert, then by pair
    block_experts = aligned.block_experts.cpu()[: total // bm]
    for b, expert in enumerate(block_experts.tolist()):
        rows = used[b * bm : (b + 1) * bm]
        rows = rows[rows < n].long()
        assert len(rows) > 0, f"block {b} holds padding only"
        assert (flat[rows] == expert).all(), f"block {b} mixes experts"
    assert torch.equal(torch.bincount(block_experts.long(), minlength=num_experts), (counts + bm - 1) // bm)


@in_this_process
@pytest.mark.parametrize("block_m", [16, 32])
@pytest.mark.parametrize("tokens", [1, 3, 17, 40])
def test_align_puts_every_pair_once_in_single_expert_blocks_padded_with_the_sentinel(tokens, block_m):
    _, _, ids = routed(tokens, 8)
    check_aligned(poisoned(lambda: kernels.align_pairs(ids, 8, block_m)), ids, 8)


@in_this_process
def test_align_of_pairs_on_few_of_many_experts_pads_only_the_experts_with_pairs():
    ids = torch.tensor([[5, 60], [60, 5], [61, 0]] * 7, device=DEVICE)  # 4 of 64 experts
    aligned = poisoned(lambda: kernels.align_pairs(ids, 64, 16))
    check_aligned(aligned, ids, 64)
    assert int(aligned.total) == 16 * 4


# --- the experts' sum --------------------------------------------------------------------


@in_this_process
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 3, 17])
@pytest.mark.parametrize("num_experts, inter", [(4, 32), (8, 48)])
def test_matches_the_reference_held_to_float64(dtype, tokens, num_experts, inter):
    w13, w2 = experts(num_experts, inter, seed=tokens)
    x, weights, ids = routed(tokens, num_experts, seed=tokens + 1)
    expected = reference(x, w13, w2, weights.double(), ids)

    got = run(x, w13, w2, weights, ids, dtype)

    assert got.dtype == dtype and got.shape == x.shape
    assert rel_error(got, expected) < TOL[dtype]
    in_dtype = reference(x.to(dtype), w13.to(dtype), w2.to(dtype), weights, ids)
    assert rel_error(got, expected) < 2 * rel_error(in_dtype, expected) + TOL[dtype] / 10


@in_this_process
@pytest.mark.parametrize("dtype", DTYPES)
def test_routing_weights_in_the_models_dtype_or_fp32_follow_the_references_rule(dtype):
    # Qwen3-MoE rounds the weights to the model's dtype first, Mixtral multiplies in fp32
    w13, w2 = experts(8, 32, seed=3)
    x, weights, ids = routed(17, 8, seed=4)
    rounded = weights.to(dtype)
    for w in (weights, rounded):
        expected = reference(x, w13, w2, w.double(), ids)
        assert rel_error(run(x, w13, w2, w, ids, dtype), expected) < TOL[dtype]
    # the rounded weights give what the reference gives with them, not the fp32 weights' sum
    got = run(x, w13, w2, rounded, ids, dtype).double()
    if dtype != torch.float32:
        with_fp32 = reference(x, w13, w2, weights.double(), ids)
        with_rounded = reference(x, w13, w2, rounded.double(), ids)
        assert (got - with_rounded).norm() < (got - with_fp32).norm()


@in_this_process
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_experts_without_tokens_are_never_read(dtype):
    w13, w2 = experts(8, 32, seed=5)
    x, _, _ = routed(17, 8, seed=6)
    ids = torch.tensor([[3, 5], [5, 3]] * 8 + [[1, 3]], device=DEVICE)
    weights = torch.full((17, 2), 0.5, device=DEVICE)
    idle = [0, 2, 4, 6, 7]
    poisoned_w13, poisoned_w2 = w13.clone(), w2.clone()
    poisoned_w13[idle] = float("nan")
    poisoned_w2[idle] = float("nan")

    got = run(x, poisoned_w13, poisoned_w2, weights, ids, dtype)

    assert not got.isnan().any()
    assert rel_error(got, reference(x, w13, w2, weights.double(), ids)) < TOL[dtype]


@in_this_process
@pytest.mark.parametrize("top_k", [1, 2])
def test_every_token_on_one_expert_fills_several_blocks_of_it(top_k):
    w13, w2 = experts(4, 32, seed=7)
    x, weights, _ = routed(40, 4, top_k=top_k, seed=8)  # 40 rows of expert 2: three blocks of 16
    ids = torch.tensor([[2, 0][:top_k]] * 40, device=DEVICE)
    expected = reference(x, w13, w2, weights.double(), ids)
    assert rel_error(run(x, w13, w2, weights, ids, torch.float32), expected) < TOL[torch.float32]


@in_this_process
@pytest.mark.parametrize(
    "config",
    [
        kernels.MoeConfig(block_m=16, block_n=16, block_k=16),
        kernels.MoeConfig(block_m=32, block_n=64, block_k=64),  # K tiles past hidden 80 and inter 48
        kernels.MoeConfig(block_m=64, block_n=32, block_k=32),
    ],
    ids=["16x16x16", "32x64x64", "64x32x32"],
)
def test_tiles_that_do_not_divide_the_shapes_give_the_same_sum(config):
    hidden = 80
    w13, w2 = experts(6, 48, hidden=hidden, seed=9)
    x, weights, ids = routed(19, 6, hidden=hidden, seed=10)
    expected = reference(x, w13, w2, weights.double(), ids)
    got = run(x, w13, w2, weights, ids, torch.float32, config=config)
    assert rel_error(got, expected) < TOL[torch.float32]


@in_this_process
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 17])
def test_fp8_experts_match_the_reference_on_their_dequantized_weights(dtype, tokens):
    w13, w2 = experts(8, 48, seed=11)
    x, weights, ids = routed(tokens, 8, seed=12)
    (q13, s13), (q2, s2) = quantize_rows(w13), quantize_rows(w2)
    expected = reference(x, dequantized(q13, s13), dequantized(q2, s2), weights.double(), ids)

    got = run(x, q13, q2, weights, ids, dtype, w13_scale=s13, w2_scale=s2)

    assert rel_error(got, expected) < TOL[dtype]
    assert rel_error(got, reference(x, w13, w2, weights.double(), ids)) < 0.1  # fp8's own error


@in_this_process
def test_the_same_call_gives_the_same_bits_and_no_tokens_give_an_empty_sum():
    w13, w2 = experts(8, 32, seed=13)
    x, weights, ids = routed(17, 8, seed=14)
    first = run(x, w13, w2, weights, ids, torch.float16)
    assert torch.equal(first, run(x, w13, w2, weights, ids, torch.float16))
    empty = kernels.fused_moe(x[:0].float(), w13.float(), w2.float(), weights[:0], ids[:0])
    assert empty.shape == (0, HIDDEN)


def test_tiles_grow_with_the_rows_each_expert_gets():
    decode = kernels.moe_config(1, 8, 128)
    prefill = kernels.moe_config(4096, 8, 128)
    assert decode.block_m == 16 and prefill.block_m > decode.block_m
    assert kernels.moe_config(128, 2, 8).block_m > decode.block_m  # 32 rows an expert


def test_fp8_weights_without_scales_or_mismatched_shapes_are_refused():
    w13, w2 = experts(4, 32)
    x, weights, ids = routed(3, 4)
    (q13, s13), (q2, s2) = quantize_rows(w13), quantize_rows(w2)
    with pytest.raises(ValueError, match="need their scales"):
        kernels.fused_moe(x.float(), q13, q2, weights, ids)
    with pytest.raises(ValueError, match="w13_scale"):
        kernels.fused_moe(x.float(), q13, q2, weights, ids, w13_scale=s13[:, :8], w2_scale=s2)
    with pytest.raises(ValueError, match="w2 \\[E, H, I\\]"):
        kernels.fused_moe(x.float(), w13.float(), w2[:, :, :16].float(), weights, ids)


# --- the layer ---------------------------------------------------------------------------


def moe_block(architecture: str) -> moe.SparseMoeBlock:
    from common.models.config import ModelConfig

    fields = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)
    if architecture == "MixtralForCausalLM":
        fields = dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32)
    config = ModelConfig.from_hf_config(tiny_hf_config(architecture, hidden_size=HIDDEN, **fields))
    with torch.device(DEVICE):
        block = moe.SparseMoeBlock(config)
    w13, w2 = experts(8, 32, seed=15)
    g = torch.Generator().manual_seed(16)
    with torch.no_grad():
        block.w13.copy_(w13)
        block.w2.copy_(w2)
        block.router_weight.copy_(torch.randn(8, HIDDEN, generator=g))
    return block


def test_fp8_experts_where_the_reference_runs_are_dequantized_once_into_the_dense_weights(monkeypatch):
    block = moe_block("Qwen3MoeForCausalLM")
    w13, w2 = block.w13.clone(), block.w2.clone()
    monkeypatch.setattr(moe, "fused_moe_kernels", lambda t: None)  # as on the CPU

    block.quantize_fp8()

    assert block.w13.dtype == torch.float32 and block.w13_scale is None and block.w2_scale is None
    for dense, original in ((block.w13, w13), (block.w2, w2)):
        q, scales = quantize_rows(original)
        torch.testing.assert_close(dense.double(), dequantized(q, scales), rtol=1e-6, atol=0)


@in_this_process
@pytest.mark.parametrize("architecture", ["Qwen3MoeForCausalLM", "MixtralForCausalLM"])
def test_fp8_experts_where_the_kernels_run_stay_fp8_and_give_the_dequantized_sum(architecture, monkeypatch):
    block = moe_block(architecture)
    x = routed(17, 8, seed=17)[0].float()
    monkeypatch.setattr(moe, "fused_moe_kernels", lambda t: kernels)  # as on a CUDA device

    block.quantize_fp8()
    with torch.no_grad():
        got = poisoned(lambda: block(x))

    assert block.w13.dtype == FP8 and block.w2.dtype == FP8
    assert block.w13_scale.shape == (8, 64) and block.w2_scale.shape == (8, HIDDEN)
    weights, ids = select_experts(x @ block.router_weight.T, 2, block.renormalize)
    w13, w2 = dequantized(block.w13, block.w13_scale), dequantized(block.w2, block.w2_scale)
    assert rel_error(got, reference(x.double(), w13, w2, weights.double(), ids)) < TOL[torch.float32]


def test_the_kernels_serve_cuda_tensors_only():
    assert moe.fused_moe_kernels(torch.zeros(1, device=DEVICE)) is (
        kernels if DEVICE.type == "cuda" else None
    )


def test_a_model_captures_in_cuda_graphs_only_where_its_experts_run_the_kernels(monkeypatch):
    block = moe_block("Qwen3MoeForCausalLM")
    model = nn.ModuleList([nn.Linear(2, 2), block])
    assert moe.experts_capture_in_cuda_graphs(nn.ModuleList([nn.Linear(2, 2)]))
    assert moe.experts_capture_in_cuda_graphs(model) == (DEVICE.type == "cuda")
    monkeypatch.setattr(moe, "USE_TRITON_MOE", False)  # the reference reads counts back
    assert not moe.experts_capture_in_cuda_graphs(model)
