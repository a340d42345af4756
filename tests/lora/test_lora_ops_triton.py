"""The Triton LoRA kernels (common/lora/lora_ops_triton.py) give the torch reference's results
(lora_ops.py), both held to a float64 run of the reference: at tiny shapes, with tokens of
several adapters and of the base model mixed in one batch, ranks below the padded rank, one
to three output bands, K split or not (the split's partials summed by each tile's last
program, whose arrival counters are zero again after every call).

Without a CUDA device the kernels run in Triton's interpreter, which must be switched on
before triton is first imported (as tests/attention/conftest.py does for its directory); it
is switched on here through triton's knob, the TRITON_INTERPRET variable put back as it was.
When something imported triton first (transformers and peft do), this module's tests run in
a child process of their own instead. fp32 and fp16 only on CPU: the interpreter's tl.dot is
wrong on bf16.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _kernels_can_run_here() -> bool:
    """True on a CUDA device, or once Triton's interpreter is on and the kernels were
    decorated under it."""
    if DEVICE.type == "cuda":
        return True
    if "triton" not in sys.modules:
        previous = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            import triton

            triton.knobs.runtime.interpret = True
        finally:
            if previous is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = previous
    from common.lora import lora_ops_triton

    return type(lora_ops_triton._shrink_kernel).__name__ == "InterpretedFunction"


KERNELS_HERE = _kernels_can_run_here()
in_this_process = pytest.mark.skipif(
    not KERNELS_HERE, reason="triton was imported before its interpreter could be switched on: run in a child"
)

from common.lora import lora_ops as reference  # noqa: E402
from common.lora import lora_ops_triton as kernels  # noqa: E402
from tests.lora.lora_op_cases import make_batch, poisoned, rel_error  # noqa: E402

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
# relative error (Frobenius) against the float64 reference
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


if not KERNELS_HERE:  # defined only where it is the way the kernels run, so it never shows as skipped

    def test_kernels_in_a_child_process_with_the_interpreter_on():
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        root = Path(__file__).resolve().parents[2]
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-x",
                "-p",
                "no:cacheprovider",
                str(Path(__file__).resolve()),
            ],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=840,
        )
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def make_weights(ranks: list[int], max_rank: int, in_features: int, bands: tuple[int, ...], seed: int):
    """a [S, n R, in], b [S, out, R], scales [S] in float64, rows of A past each adapter's
    rank zero (as the slot loader leaves them); B's padding columns are random, unread."""
    g = torch.Generator().manual_seed(seed)
    n = len(bands) - 1
    a = torch.randn(len(ranks), n * max_rank, in_features, generator=g, dtype=torch.float64)
    for slot, rank in enumerate(ranks):
        a[slot].view(n, max_rank, in_features)[:, rank:] = 0
    b = torch.randn(len(ranks), bands[-1], max_rank, generator=g, dtype=torch.float64)
    scales = torch.rand(len(ranks), generator=g, dtype=torch.float64) + 0.5
    return a.to(DEVICE), b.to(DEVICE), scales.to(DEVICE)


def random_slots(tokens: int, num_slots: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, num_slots, (tokens,), generator=g).tolist()


BAND_SETS = [(0, 40), (0, 24, 56), (0, 24, 32, 40)]


@in_this_process
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 7, 33])
@pytest.mark.parametrize("bands", BAND_SETS, ids=["1band", "2bands", "3bands"])
def test_shrink_gives_each_token_its_slots_A_and_zero_on_base_rows(dtype, tokens, bands):
    ranks, max_rank, k = [4, 8, 8], 8, 40
    a, _, _ = make_weights(ranks, max_rank, k, bands, seed=tokens)
    slots = random_slots(tokens, len(ranks), seed=tokens + 1)
    batch = make_batch(slots, ranks, DEVICE)
    x = torch.randn(tokens, k, dtype=torch.float64, device=DEVICE)
    expected = reference.lora_shrink(x, a, batch, len(bands) - 1)

    got = poisoned(lambda: kernels.lora_shrink(x.to(dtype), a.to(dtype), batch, len(bands) - 1))

    assert got.dtype == dtype and got.shape == expected.shape
    assert not got.isnan().any()
    base = torch.tensor(slots, device=DEVICE) < 0
    assert torch.equal(got[base], torch.zeros_like(got[base]))
    if not base.all():
        assert rel_error(got, expected) < TOL[dtype]


@in_this_process
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 7, 33])
@pytest.mark.parametrize("bands", BAND_SETS, ids=["1band", "2bands", "3bands"])
def test_expand_adds_each_tokens_scaled_bands_and_leaves_base_rows(dtype, tokens, bands):
    ranks, max_rank = [4, 8, 8], 8
    n = len(bands) - 1
    _, b, scales = make_weights(ranks, max_rank, 16, bands, seed=tokens)
    slots = random_slots(tokens, len(ranks), seed=tokens + 2)
    batch = make_batch(slots, ranks, DEVICE)
    shrunk = torch.randn(tokens, n, max_rank, dtype=torch.float64, device=DEVICE)
    for slot, rank in enumerate(ranks):  # past a slot's rank its shrunk columns are zero
        shrunk[torch.tensor(slots, device=DEVICE) == slot, :, rank:] = 0
    shrunk = shrunk.view(tokens, n * max_rank).to(dtype)
    y = torch.randn(tokens, bands[-1], dtype=torch.float64, device=DEVICE).to(dtype)
    expected = y.double()
    reference.lora_expand_add(expected, shrunk.double(), b, scales, bands, batch)

    got = y.clone()
    kernels.lora_expand_add(got, shrunk, b.to(dtype), scales.float(), bands, batch)

    base = torch.tensor(slots, device=DEVICE) < 0
    assert torch.equal(got[base], y[base])
    assert rel_error(got, expected) < TOL[dtype]


@in_this_process
@pytest.mark.parametrize("split_k", [1, 2, 4, 8])
@pytest.mark.parametrize("block_m", [16, 32])
def test_shrink_split_over_k_sums_the_same_even_where_a_split_gets_no_k(split_k, block_m):
    # K = 72: 3 blocks of 32, the last one partial; 8 splits leave some with nothing to add
    ranks, k, bands = [8, 2, 8], 72, (0, 16, 32)
    a, _, _ = make_weights(ranks, 8, k, bands, seed=5)
    slots = [1, -1, 0, 0, 2, -1, 0, 1, 2, 2, 0, -1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]
    batch = make_batch(slots, ranks, DEVICE)
    x = torch.randn(len(slots), k, dtype=torch.float64, device=DEVICE)
    expected = reference.lora_shrink(x, a, batch, 2)
    config = kernels.ShrinkConfig(block_m=block_m, block_n=16, block_k=32, split_k=split_k)

    got = poisoned(lambda: kernels.lora_shrink_with(x.float(), a.float(), batch, config))

    assert rel_error(got, expected) < TOL[torch.float32]


@in_this_process
@pytest.mark.parametrize("split_k", [2, 8])
def test_split_k_counters_are_zero_again_after_a_call_so_a_replay_needs_no_memset(split_k):
    # the last program of each tile resets its arrival counter; a second call (as a graph
    # replay) finds them as the first did and gives the same result
    ranks, k, bands = [8, 4], 64, (0, 8, 16)
    a, _, _ = make_weights(ranks, 8, k, bands, seed=17)
    batch = make_batch([0, 1, -1, 1, 0, 0, 1, -1, 0], ranks, DEVICE)
    x = torch.randn(9, k, dtype=torch.float64, device=DEVICE)
    expected = reference.lora_shrink(x, a, batch, 2)
    config = kernels.ShrinkConfig(block_m=16, block_n=16, block_k=16, split_k=split_k)

    first = poisoned(lambda: kernels.lora_shrink_with(x.float(), a.float(), batch, config))
    counters = kernels._arrival_buffers[x.device]
    assert not counters.any()
    again = poisoned(lambda: kernels.lora_shrink_with(x.float(), a.float(), batch, config))

    assert not counters.any()
    assert torch.equal(first, again)
    assert rel_error(first, expected) < TOL[torch.float32]


@in_this_process
def test_a_shrink_without_room_for_its_counters_runs_unsplit_with_the_same_result(monkeypatch):
    # as in a CUDA-graph capture that finds the counter buffer too small
    ranks, k, bands = [8, 8], 96, (0, 8)
    a, _, _ = make_weights(ranks, 8, k, bands, seed=19)
    batch = make_batch([1, 0, -1, 1, 1], ranks, DEVICE)
    x = torch.randn(5, k, dtype=torch.float64, device=DEVICE)
    expected = reference.lora_shrink(x, a, batch, 1)
    monkeypatch.setattr(kernels, "_arrivals", lambda device, count: None)
    config = kernels.ShrinkConfig(block_m=16, block_n=16, block_k=32, split_k=4)

    got = poisoned(lambda: kernels.lora_shrink_with(x.float(), a.float(), batch, config))

    assert rel_error(got, expected) < TOL[torch.float32]
    assert torch.equal(got[2], torch.zeros_like(got[2]))


@in_this_process
def test_a_batch_of_base_model_tokens_only_shrinks_to_zeros_and_leaves_y():
    ranks, bands = [8, 8, 8], (0, 24, 32, 40)
    a, b, scales = make_weights(ranks, 8, 40, bands, seed=7)
    batch = make_batch([-1] * 9, ranks, DEVICE)
    x = torch.randn(9, 40, device=DEVICE)
    y = torch.randn(9, 40, device=DEVICE)
    for split_k in (1, 4):
        config = kernels.ShrinkConfig(block_m=16, block_n=32, block_k=16, split_k=split_k)
        shrunk = poisoned(lambda: kernels.lora_shrink_with(x, a.float(), batch, config))  # noqa: B023
        assert torch.equal(shrunk, torch.zeros_like(shrunk))
    got = y.clone()
    kernels.lora_expand_add(got, torch.randn(9, 24, device=DEVICE), b.float(), scales.float(), bands, batch)
    assert torch.equal(got, y)


@in_this_process
@pytest.mark.parametrize("slots", [[1] * 40, [0] * 17 + [2] * 17 + [-1] * 6, list(range(-1, 3)) * 5])
def test_tiles_follow_the_tokens_however_they_spread_over_the_slots(slots):
    # all in one (middle) slot, two full slots and an empty one, round robin with base tokens
    ranks, bands = [8, 8, 8], (0, 24, 40)
    a, b, scales = make_weights(ranks, 8, 32, bands, seed=11)
    batch = make_batch(slots, ranks, DEVICE)
    x = torch.randn(len(slots), 32, dtype=torch.float64, device=DEVICE)
    y = torch.randn(len(slots), 40, dtype=torch.float64, device=DEVICE)
    expected_shrunk = reference.lora_shrink(x, a, batch, 2)
    expected = y.clone()
    reference.lora_expand_add(expected, expected_shrunk, b, scales, bands, batch)

    shrunk = poisoned(lambda: kernels.lora_shrink(x.float(), a.float(), batch, 2))
    got = y.float()
    kernels.lora_expand_add(got, shrunk, b.float(), scales.float(), bands, batch)

    assert rel_error(shrunk, expected_shrunk) < TOL[torch.float32]
    assert rel_error(got, expected) < TOL[torch.float32]


# SmolLM2-135M: hidden 576, intermediate 1536, 9 query heads and 3 KV heads of 64
SMOLLM2_MODULES = {
    "qkv": (576, (0, 576, 768, 960)),
    "o": (576, (0, 576)),
    "gate_up": (576, (0, 1536, 3072)),
    "down": (1536, (0, 576)),
}


@in_this_process
@pytest.mark.parametrize("module", list(SMOLLM2_MODULES))
def test_smollm2_shapes_shrink_and_expand_like_the_reference(module):
    in_features, bands = SMOLLM2_MODULES[module]
    ranks, max_rank, tokens = [4, 8, 2], 8, 7
    a, b, scales = make_weights(ranks, max_rank, in_features, bands, seed=13)
    slots = [0, 2, -1, 1, 0, 2, 1]
    batch = make_batch(slots, ranks, DEVICE)
    x = torch.randn(tokens, in_features, dtype=torch.float64, device=DEVICE)
    y = torch.randn(tokens, bands[-1], dtype=torch.float64, device=DEVICE)
    expected = y.clone()
    reference.lora_expand_add(
        expected, reference.lora_shrink(x, a, batch, len(bands) - 1), b, scales, bands, batch
    )

    got = y.float()
    shrunk = poisoned(lambda: kernels.lora_shrink(x.float(), a.float(), batch, len(bands) - 1))
    kernels.lora_expand_add(got, shrunk, b.float(), scales.float(), bands, batch)

    assert rel_error(got - y, expected - y) < TOL[torch.float32]


@in_this_process
def test_bands_that_do_not_cover_the_output_or_number_more_than_three_are_refused():
    ranks = [8]
    batch = make_batch([0, 0], ranks, DEVICE)
    y = torch.zeros(2, 40, device=DEVICE)
    b = torch.zeros(1, 40, 8, device=DEVICE)
    with pytest.raises(ValueError, match="bands"):
        kernels.lora_expand_add(
            y, torch.zeros(2, 16, device=DEVICE), b, torch.ones(1, device=DEVICE), (0, 20, 30), batch
        )
    with pytest.raises(ValueError, match="bands"):
        kernels.lora_expand_add(
            y, torch.zeros(2, 32, device=DEVICE), b, torch.ones(1, device=DEVICE), (0, 10, 20, 30, 40), batch
        )
    with pytest.raises(ValueError, match="slots"):
        kernels.lora_shrink(torch.zeros(2, 16, device=DEVICE), torch.zeros(2, 8, 16, device=DEVICE), batch, 1)
