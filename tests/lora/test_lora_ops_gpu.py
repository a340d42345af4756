"""The Triton LoRA kernels at Llama-3-8B's shapes in bf16 on a CUDA device, held to a float64
run of the torch reference (lora_ops.py), and replayed from a CUDA graph after the batch's
tokens moved between slots; the split-K shrink gives the same bits on every run.

bf16 tolerance: relative (Frobenius) error under 1e-2 against float64. The kernels round the
shrink to bf16 once and y once (the reference rounds its delta, the scaled delta and y); at
these sizes bf16's 8 bits give errors of about 3e-3.
"""

from __future__ import annotations

import pytest
import torch

from pdserve.bench.timing import capture_graph
from tests.lora.lora_op_cases import make_batch, poisoned, rel_error

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEVICE = torch.device("cuda")
TOL = 1e-2

# Llama-3-8B: hidden 4096, intermediate 14336, 32 query heads and 8 KV heads of 128
LLAMA3_8B_MODULES = {
    "qkv": (4096, (0, 4096, 5120, 6144)),
    "o": (4096, (0, 4096)),
    "gate_up": (4096, (0, 14336, 28672)),
    "down": (14336, (0, 4096)),
}


def make_weights(ranks, max_rank, in_features, bands, seed):
    """float64 A, B and scales, scaled so that a product is of y's size; A's rows past each
    adapter's rank zero, as the slot loader leaves them."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    n = len(bands) - 1
    a = torch.randn(len(ranks), n * max_rank, in_features, generator=g, device=DEVICE, dtype=torch.float64)
    a /= in_features**0.5
    for slot, rank in enumerate(ranks):
        a[slot].view(n, max_rank, in_features)[:, rank:] = 0
    b = torch.randn(len(ranks), bands[-1], max_rank, generator=g, device=DEVICE, dtype=torch.float64)
    b /= max_rank**0.5
    scales = torch.rand(len(ranks), generator=g, device=DEVICE, dtype=torch.float64) + 0.5
    return a, b, scales


@pytest.mark.parametrize("module", list(LLAMA3_8B_MODULES))
@pytest.mark.parametrize(("tokens", "max_rank"), [(1, 16), (64, 16), (64, 64), (2048, 16), (8192, 8)])
def test_llama3_8b_shapes_in_bf16_match_the_float64_reference(module, tokens, max_rank):
    from common.lora import lora_ops as reference
    from common.lora import lora_ops_triton as kernels

    in_features, bands = LLAMA3_8B_MODULES[module]
    num_slots = 16 if tokens == 8192 else 8
    g = torch.Generator().manual_seed(tokens + max_rank)
    ranks = [max_rank, max_rank // 2] * (num_slots // 2)
    slots = torch.randint(-1, num_slots, (tokens,), generator=g).tolist()
    batch = make_batch(slots, ranks, DEVICE)
    a, b, scales = make_weights(ranks, max_rank, in_features, bands, seed=tokens)
    x = torch.randn(tokens, in_features, device=DEVICE, dtype=torch.float64)
    y = torch.randn(tokens, bands[-1], device=DEVICE, dtype=torch.float64).bfloat16()
    expected_shrunk = reference.lora_shrink(x, a, batch, len(bands) - 1)
    expected = y.double()
    reference.lora_expand_add(expected, expected_shrunk, b, scales, bands, batch)

    shrunk = poisoned(lambda: kernels.lora_shrink(x.bfloat16(), a.bfloat16(), batch, len(bands) - 1))
    got = y.clone()
    kernels.lora_expand_add(got, shrunk, b.bfloat16(), scales.float(), bands, batch)

    base = torch.tensor(slots, device=DEVICE) < 0
    assert not shrunk.isnan().any()
    assert torch.equal(shrunk[base], torch.zeros_like(shrunk[base]))
    assert torch.equal(got[base], y[base])
    if not base.all():
        assert rel_error(shrunk, expected_shrunk) < TOL
        assert rel_error(got[~base] - y[~base], expected[~base] - y[~base].double()) < TOL


def test_split_k_shrink_gives_the_same_bits_on_every_run_and_replay():
    """Each tile's last program sums the split-K partials in split order, so the result does
    not depend on which program came last: a partial read before it landed, or a counter
    left unreset, shows as a run that differs (down's shrink at decode: 32 splits)."""
    from common.lora import lora_ops as reference
    from common.lora import lora_ops_triton as kernels

    tokens, num_slots, max_rank = 64, 8, 16
    k, bands = LLAMA3_8B_MODULES["down"]
    ranks = [max_rank] * num_slots
    a, _, _ = make_weights(ranks, max_rank, k, bands, seed=3)
    batch = make_batch([t % num_slots for t in range(tokens)], ranks, DEVICE)
    x = torch.randn(tokens, k, device=DEVICE, dtype=torch.float64)
    config = kernels.shrink_config(
        tokens, a.shape[1], k, torch.cuda.get_device_properties(0).multi_processor_count
    )
    assert config.split_k > 1
    xb, ab = x.bfloat16(), a.bfloat16()
    first = kernels.lora_shrink(xb, ab, batch, 1)
    assert rel_error(first, reference.lora_shrink(x, a, batch, 1)) < TOL

    eager = [kernels.lora_shrink(xb, ab, batch, 1) for _ in range(200)]
    static = {}

    def shrink():
        static["out"] = kernels.lora_shrink(xb, ab, batch, 1)

    graph = capture_graph(shrink)
    replays = []
    for _ in range(200):
        static["out"].fill_(float("nan"))
        graph.replay()
        replays.append(static["out"].clone())

    assert all(torch.equal(r, first) for r in eager)
    assert all(torch.equal(r, first) for r in replays)
    assert not kernels._arrival_buffers[xb.device].any()


def test_a_captured_graph_follows_the_batch_when_tokens_move_between_slots():
    """The grids depend on T and S only: one capture serves any spread of the tokens."""
    from common.lora import lora_ops as reference
    from common.lora import lora_ops_triton as kernels

    tokens, num_slots, max_rank = 64, 8, 16
    ranks = [max_rank] * num_slots
    layers = {
        name: make_weights(ranks, max_rank, k, bands, seed=i)
        for i, (name, (k, bands)) in enumerate(LLAMA3_8B_MODULES.items())
    }
    static = make_batch([-1] * tokens, ranks, DEVICE)  # captured with every token on the base model
    xs = {
        name: torch.randn(tokens, k, device=DEVICE).bfloat16() for name, (k, _) in LLAMA3_8B_MODULES.items()
    }
    ys = {
        name: torch.zeros(tokens, bands[-1], device=DEVICE).bfloat16()
        for name, (_, bands) in LLAMA3_8B_MODULES.items()
    }
    weights = {name: (a.bfloat16(), b.bfloat16(), s.float()) for name, (a, b, s) in layers.items()}

    def layer_step():
        for name, (_, bands) in LLAMA3_8B_MODULES.items():
            a, b, s = weights[name]
            shrunk = kernels.lora_shrink(xs[name], a, static, len(bands) - 1)
            kernels.lora_expand_add(ys[name], shrunk, b, s, bands, static)

    graph = capture_graph(layer_step)

    spreads = [[t % num_slots for t in range(tokens)], [3] * tokens, [-1] * 10 + [5] * 30 + [0] * 24]
    for slots in spreads:
        batch = make_batch(slots, ranks, DEVICE)
        static.token_slots.copy_(batch.token_slots)
        static.sorted_tokens.copy_(batch.sorted_tokens)
        static.slot_starts.copy_(batch.slot_starts)
        before = {name: torch.randn_like(y, dtype=torch.float32).bfloat16() for name, y in ys.items()}
        for name, y in ys.items():
            y.copy_(before[name])
        graph.replay()
        for name, (_, bands) in LLAMA3_8B_MODULES.items():
            a, b, s = layers[name]
            expected = before[name].double()
            shrunk = reference.lora_shrink(xs[name].double(), a, batch, len(bands) - 1)
            reference.lora_expand_add(expected, shrunk, b, s, bands, batch)
            adapted = torch.tensor(slots, device=DEVICE) >= 0
            delta = ys[name][adapted].double() - before[name][adapted].double()
            assert rel_error(delta, expected[adapted] - before[name][adapted].double()) < TOL, name
            assert torch.equal(ys[name][~adapted], before[name][~adapted]), name
