"""The small-batch mixture-of-experts path (fused_moe_triton.fused_moe_small_batch: routing,
gate/up by pair, down with the sum over k) gives what the routing of
fused_moe_reference.select_experts followed by the experts' sum gives: its routing kernel
picks the reference's experts and weights, its sum is held to a float64 run of the reference
and to the grouped kernels (fused_moe_triton.fused_moe), with fp8 experts too, and
SparseMoeBlock takes it when USE_SMALL_BATCH_MOE is on (the default).

Kernels run as in test_fused_moe_triton.py: in Triton's interpreter without a CUDA device
(switched on by tests/models/conftest.py, or in a child process should triton have been
imported first), and in fp32 and fp16 only on CPU, the interpreter's tl.dot being wrong on
bf16.
"""

from __future__ import annotations

import pytest
import torch

from common.models import fused_moe_triton as kernels
from common.models import moe
from common.models.config import ModelConfig
from common.models.fp8_weights import FP8, quantize_rows
from common.models.fused_moe_reference import fused_moe as reference
from common.models.fused_moe_reference import select_experts
from tests.lora.lora_op_cases import poisoned, rel_error
from tests.models.interpreter_child import run_in_interpreter_child
from tests.tiny_llama import tiny_hf_config

DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
KERNELS_HERE = DEVICE.type == "cuda" or type(kernels._token_down_kernel).__name__ == "InterpretedFunction"
in_this_process = pytest.mark.skipif(
    not KERNELS_HERE, reason="triton was imported before its interpreter could be switched on: run in a child"
)

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
# relative error (Frobenius) against the float64 reference
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
HIDDEN, INTER, EXPERTS, TOP_K = 64, 48, 8, 2
# K tiles that divide the hidden size but not the intermediate one, gate/up column tiles past it
SMALL = kernels.SmallBatchConfig(gate_up_block_n=32, down_block_n=32, block_k=32)
GROUPED = kernels.MoeConfig(block_m=16, block_n=32, block_k=32)


if not KERNELS_HERE:  # defined only where it is the way the kernels run, so it never shows as skipped

    def test_kernels_in_a_child_process_with_the_interpreter_on():
        run_in_interpreter_child(__file__)


def experts(num_experts: int = EXPERTS, inter: int = INTER, hidden: int = HIDDEN, seed: int = 0):
    """Expert weights w13 [E, 2I, H], w2 [E, H, I] in float64, scaled so outputs stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=g, dtype=torch.float64) / hidden**0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=g, dtype=torch.float64) / inter**0.5
    return w13.to(DEVICE), w2.to(DEVICE)


def tokens_and_logits(tokens: int, num_experts: int = EXPERTS, hidden: int = HIDDEN, seed: int = 1):
    """x [T, H] in float64 and router logits [T, E] in fp32."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g, dtype=torch.float64)
    logits = torch.randn(tokens, num_experts, generator=g)
    return x.to(DEVICE), logits.to(DEVICE)


def small_batch(x, w13, w2, logits, dtype, top_k=TOP_K, renormalize=True, in_model_dtype=False, **scales):
    """The small-batch path on x and the experts in `dtype` (fp8 experts kept), unwritten memory NaN."""

    def cast(w):
        return w if w.dtype == FP8 else w.to(dtype)

    return poisoned(
        lambda: kernels.fused_moe_small_batch(
            x.to(dtype),
            cast(w13),
            cast(w2),
            logits,
            top_k,
            renormalize,
            in_model_dtype,
            config=SMALL,
            **scales,
        )
    )


def dequantized(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.double() * scales[..., None].double()


def assert_same_roundings(got: torch.Tensor, grouped: torch.Tensor) -> None:
    """The small-batch path and the grouped kernels round at the same steps, so they differ
    only by the matmuls' fp32 accumulation order: by fp32 noise in fp32, and in 16 bits in the
    elements where that order moves a rounding by one step (more of them in bf16's 8 bits: on an
    H100, 9.3e-4 relative at 5 tokens)."""
    assert got.dtype == grouped.dtype
    if got.dtype == torch.float32:
        assert rel_error(got, grouped.double()) < 1e-6
    elif got.dtype == torch.float16:
        assert rel_error(got, grouped.double()) < 5e-4
        assert (got == grouped).double().mean() > 0.95
    else:
        assert rel_error(got, grouped.double()) < 3e-3
        assert (got == grouped).double().mean() > 0.5


# --- routing ---------------------------------------------------------------------------


@in_this_process
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("top_k", [2, 8])
@pytest.mark.parametrize("num_experts", [8, 128, 60])
@pytest.mark.parametrize("tokens", [1, 5, 16])
def test_routing_picks_the_references_experts_and_weights(tokens, num_experts, top_k, renormalize):
    logits = torch.randn(tokens, num_experts, generator=torch.Generator().manual_seed(num_experts + tokens))
    expected_weights, expected_ids = select_experts(logits, top_k, renormalize)

    weights, ids = poisoned(lambda: kernels.select_experts(logits.to(DEVICE), top_k, renormalize))

    assert weights.dtype == torch.float32 and ids.dtype == torch.int64
    assert torch.equal(ids.cpu(), expected_ids)
    torch.testing.assert_close(weights.cpu(), expected_weights, rtol=4e-7, atol=1e-9)
    if renormalize:
        torch.testing.assert_close(weights.sum(-1).cpu(), torch.ones(tokens), rtol=4e-7, atol=0)


@in_this_process
@pytest.mark.parametrize("logit_dtype", [torch.float16, torch.bfloat16])
def test_routing_16_bit_logits_softmaxes_in_fp32_and_breaks_ties_toward_the_lower_expert(logit_dtype):
    # 16-bit logits tie often (here on quarters, always): the reference's torch.topk orders
    # ties as it pleases
    logits = (torch.randn(16, 60, generator=torch.Generator().manual_seed(3)) * 4).round() / 4
    logits = logits.to(logit_dtype)
    expected_weights, _ = select_experts(logits, 8, renormalize=True)

    weights, ids = kernels.select_experts(logits.to(DEVICE), 8, renormalize=True)

    weights, ids = weights.cpu(), ids.cpu()
    torch.testing.assert_close(weights, expected_weights, rtol=4e-7, atol=1e-9)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    chosen = probs.gather(1, ids)
    assert torch.equal(chosen, probs.topk(8, dim=-1).values)  # as probable as the reference's
    tied = chosen[:, 1:] == chosen[:, :-1]
    assert tied.any(), "the case should hold ties"
    assert (ids[:, 1:] > ids[:, :-1])[tied].all()


@in_this_process
def test_routing_ties_go_to_the_lower_expert_id():
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0, 2.0, 1.0], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]], device=DEVICE)
    weights, ids = kernels.select_experts(logits, 4, renormalize=False)
    assert ids.tolist() == [[1, 3, 4, 2], [0, 1, 2, 3]]
    torch.testing.assert_close(weights[1].cpu(), torch.full((4,), 1 / 6), rtol=4e-7, atol=0)


# --- the experts' sum --------------------------------------------------------------------


@in_this_process
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 3, 16])
def test_matches_the_reference_held_to_float64_and_the_grouped_kernels(dtype, tokens):
    w13, w2 = experts(seed=tokens)
    x, logits = tokens_and_logits(tokens, seed=tokens + 1)
    weights, ids = select_experts(logits, TOP_K, renormalize=True)
    expected = reference(x, w13, w2, weights.double(), ids)

    got = small_batch(x, w13, w2, logits, dtype)

    assert got.dtype == dtype and got.shape == x.shape
    assert rel_error(got, expected) < TOL[dtype]
    grouped = kernels.fused_moe(x.to(dtype), w13.to(dtype), w2.to(dtype), weights, ids, config=GROUPED)
    # the same roundings: apart only by the fp32 accumulation order of the matmuls
    assert_same_roundings(got, grouped)


@in_this_process
@pytest.mark.parametrize("dtype", DTYPES)
def test_routing_weights_in_the_models_dtype_follow_the_qwen3_moe_rule(dtype):
    w13, w2 = experts(seed=3)
    x, logits = tokens_and_logits(5, seed=4)
    weights, ids = select_experts(logits, TOP_K, renormalize=False)
    rounded = weights.to(dtype)

    got = small_batch(x, w13, w2, logits, dtype, renormalize=False, in_model_dtype=True).double()

    with_rounded = reference(x, w13, w2, rounded.double(), ids)
    assert rel_error(got, with_rounded) < TOL[dtype]
    if dtype != torch.float32:  # the rounded weights' sum, not the fp32 weights'
        with_fp32 = reference(x, w13, w2, weights.double(), ids)
        assert (got - with_rounded).norm() < (got - with_fp32).norm()
        grouped = kernels.fused_moe(x.to(dtype), w13.to(dtype), w2.to(dtype), rounded, ids, config=GROUPED)
        assert_same_roundings(got.to(dtype), grouped)


@in_this_process
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 16])
def test_fp8_experts_match_the_reference_on_their_dequantized_weights(dtype, tokens):
    w13, w2 = experts(seed=11)
    x, logits = tokens_and_logits(tokens, seed=12)
    weights, ids = select_experts(logits, TOP_K, renormalize=True)
    (q13, s13), (q2, s2) = quantize_rows(w13), quantize_rows(w2)
    expected = reference(x, dequantized(q13, s13), dequantized(q2, s2), weights.double(), ids)

    got = small_batch(x, q13, q2, logits, dtype, w13_scale=s13, w2_scale=s2)

    assert rel_error(got, expected) < TOL[dtype]
    assert rel_error(got, reference(x, w13, w2, weights.double(), ids)) < 0.1  # fp8's own error
    grouped = kernels.fused_moe(x.to(dtype), q13, q2, weights, ids, s13, s2, config=GROUPED)
    assert_same_roundings(got, grouped)


@in_this_process
def test_shapes_no_tile_divides_and_many_experts_give_the_same_sum():
    hidden, inter, num_experts, top_k = 80, 40, 60, 8
    w13, w2 = experts(num_experts, inter, hidden, seed=5)
    x, logits = tokens_and_logits(3, num_experts, hidden, seed=6)
    weights, ids = select_experts(logits, top_k, renormalize=True)
    expected = reference(x, w13, w2, weights.double(), ids)
    got = small_batch(x, w13, w2, logits, torch.float32, top_k=top_k)
    assert rel_error(got, expected) < TOL[torch.float32]


@in_this_process
def test_the_same_call_gives_the_same_bits_and_no_tokens_give_an_empty_sum():
    w13, w2 = experts(seed=7)
    x, logits = tokens_and_logits(3, seed=8)
    first = small_batch(x, w13, w2, logits, torch.float16)
    assert torch.equal(first, small_batch(x, w13, w2, logits, torch.float16))
    x, w13, w2 = x.float(), w13.float(), w2.float()
    empty = kernels.fused_moe_small_batch(x[:0], w13, w2, logits[:0], TOP_K, True, False)
    assert empty.shape == (0, HIDDEN)


def test_more_tokens_than_the_limit_or_mismatched_shapes_are_refused():
    w13, w2 = experts()
    x, logits = tokens_and_logits(17)
    args = (TOP_K, True, False)
    with pytest.raises(ValueError, match="at most 16 tokens, got 17"):
        kernels.fused_moe_small_batch(x.float(), w13.float(), w2.float(), logits, *args)
    with pytest.raises(ValueError, match=r"router_logits must be \[T, E\] = \[3, 8\]"):
        kernels.fused_moe_small_batch(x[:3].float(), w13.float(), w2.float(), logits[:4], *args)
    with pytest.raises(ValueError, match=r"router_logits must be \[T, E\] = \[3, 8\]"):
        kernels.fused_moe_small_batch(x[:3].float(), w13.float(), w2.float(), logits[:3, :6], *args)
    with pytest.raises(ValueError, match=r"w2 \[E, H, I\]"):
        kernels.fused_moe_small_batch(x[:3].float(), w13.float(), w2[:, :, :16].float(), logits[:3], *args)
    with pytest.raises(ValueError, match="0 < top_k <= E"):
        kernels.fused_moe_small_batch(x[:3].float(), w13.float(), w2.float(), logits[:3], 9, True, False)
    (q13, _), (q2, s2) = quantize_rows(w13), quantize_rows(w2)
    with pytest.raises(ValueError, match="need their scales"):
        kernels.fused_moe_small_batch(x[:3].float(), q13, q2, logits[:3], *args, w2_scale=s2)


# --- the layer ---------------------------------------------------------------------------


def moe_block(architecture: str) -> moe.SparseMoeBlock:
    fields = dict(num_experts=EXPERTS, num_experts_per_tok=TOP_K, moe_intermediate_size=INTER)
    if architecture == "MixtralForCausalLM":
        fields = dict(num_local_experts=EXPERTS, num_experts_per_tok=TOP_K, intermediate_size=INTER)
    config = ModelConfig.from_hf_config(tiny_hf_config(architecture, hidden_size=HIDDEN, **fields))
    with torch.device(DEVICE):
        block = moe.SparseMoeBlock(config)
    w13, w2 = experts(seed=15)
    with torch.no_grad():
        block.w13.copy_(w13)
        block.w2.copy_(w2)
        block.router_weight.copy_(torch.randn(EXPERTS, HIDDEN, generator=torch.Generator().manual_seed(16)))
    return block


@in_this_process
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("architecture", ["Qwen3MoeForCausalLM", "MixtralForCausalLM"])
def test_the_layer_takes_the_small_batch_path_when_switched_on_with_the_same_output(
    architecture, dtype, monkeypatch
):
    block = moe_block(architecture).to(dtype)
    x = tokens_and_logits(5, seed=17)[0].to(dtype)
    monkeypatch.setattr(moe, "fused_moe_kernels", lambda t: kernels)  # as on a CUDA device
    calls = []
    small = kernels.fused_moe_small_batch
    monkeypatch.setattr(kernels, "fused_moe_small_batch", lambda *a, **kw: calls.append(a) or small(*a, **kw))
    with torch.no_grad():
        monkeypatch.setattr(moe, "USE_SMALL_BATCH_MOE", False)
        off = poisoned(lambda: block(x))
        assert not calls
        monkeypatch.setattr(moe, "USE_SMALL_BATCH_MOE", True)
        on = poisoned(lambda: block(x))
        assert len(calls) == 1
        assert calls[0][6] == (architecture == "Qwen3MoeForCausalLM")  # weights_in_model_dtype

        block(x.repeat(4, 1)[:17])  # 17 tokens: the grouped kernels
        assert len(calls) == 1

    assert_same_roundings(on, off)


@in_this_process
def test_the_layer_with_fp8_experts_passes_their_scales_to_the_small_batch_path(monkeypatch):
    block = moe_block("Qwen3MoeForCausalLM")
    x = tokens_and_logits(5, seed=18)[0].float()
    monkeypatch.setattr(moe, "fused_moe_kernels", lambda t: kernels)
    block.quantize_fp8()
    with torch.no_grad():
        monkeypatch.setattr(moe, "USE_SMALL_BATCH_MOE", False)
        off = poisoned(lambda: block(x))
        monkeypatch.setattr(moe, "USE_SMALL_BATCH_MOE", True)
        on = poisoned(lambda: block(x))
    assert block.w13.dtype == FP8
    assert_same_roundings(on, off)
