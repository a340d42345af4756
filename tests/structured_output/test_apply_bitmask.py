"""Applying a batch's bitmask: disallowed tokens become -inf, allowed ones keep their
logits, rows of unconstrained sequences are not touched."""

from __future__ import annotations

import pytest
import torch

from common.structured_output.apply_bitmask import apply_token_bitmask_


def _pack(allowed: torch.Tensor) -> torch.Tensor:
    """[rows, vocab] bool → [rows, ceil(vocab/32)] int32, bit j of word i = token 32*i + j."""
    rows, vocab = allowed.shape
    words = (vocab + 31) // 32
    padded = torch.zeros(rows, words * 32, dtype=torch.int64)
    padded[:, :vocab] = allowed.long()
    values = (padded.view(rows, words, 32) << torch.arange(32)).sum(-1)
    return torch.where(values >= 2**31, values - 2**32, values).to(torch.int32)


def _expected(logits, allowed):
    return torch.where(allowed, logits, torch.full_like(logits, float("-inf")))


@pytest.mark.parametrize("vocab", [64, 100, 49152])
def test_constrained_rows_by_index_and_the_others_untouched(vocab):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, vocab, generator=gen)
    original = logits.clone()
    allowed = torch.rand(2, vocab, generator=gen) < 0.3
    apply_token_bitmask_(logits, _pack(allowed), torch.tensor([3, 1]))
    for row in (0, 2, 4):
        assert torch.equal(logits[row], original[row])
    assert torch.equal(logits[3], _expected(original[3], allowed[0]))
    assert torch.equal(logits[1], _expected(original[1], allowed[1]))


def test_a_full_batch_mask_with_all_ones_rows():
    logits = torch.randn(3, 70)
    original = logits.clone()
    allowed = torch.ones(3, 70, dtype=torch.bool)
    allowed[1, ::3] = False
    apply_token_bitmask_(logits, _pack(allowed))
    assert torch.equal(logits[0], original[0]) and torch.equal(logits[2], original[2])
    assert torch.equal(logits[1], _expected(original[1], allowed[1]))


def test_logits_wider_than_the_mask_disallow_the_rest_and_extra_bits_are_ignored():
    logits = torch.zeros(1, 40)
    apply_token_bitmask_(logits, torch.full((1, 1), -1, dtype=torch.int32))  # 32 bits for 40 logits
    assert bool((logits[0, :32] == 0).all()) and bool(torch.isinf(logits[0, 32:]).all())
    narrow = torch.zeros(1, 20)
    apply_token_bitmask_(narrow, torch.full((1, 1), -1, dtype=torch.int32))
    assert bool((narrow == 0).all())


def test_bfloat16_logits():
    logits = torch.randn(2, 64).to(torch.bfloat16)
    allowed = torch.zeros(1, 64, dtype=torch.bool)
    allowed[0, 5] = True
    apply_token_bitmask_(logits, _pack(allowed), torch.tensor([1]))
    assert torch.isinf(logits[1]).sum() == 63 and not torch.isinf(logits[1, 5])


@pytest.mark.parametrize(
    ("logits", "bitmask", "indices", "message"),
    [
        (torch.zeros(2, 64), torch.zeros(1, 2, dtype=torch.int32), None, "pass indices"),
        (torch.zeros(2, 64), torch.zeros(2, 2, dtype=torch.int64), None, "int32 bitmask"),
        (torch.zeros(64), torch.zeros(1, 2, dtype=torch.int32), None, "2-D logits"),
        (torch.zeros(2, 64), torch.zeros(1, 2, dtype=torch.int32), torch.tensor([0, 1]), "1-D tensor of 1"),
    ],
)
def test_mismatched_shapes_are_refused(logits, bitmask, indices, message):
    with pytest.raises(ValueError, match=message):
        apply_token_bitmask_(logits, bitmask, indices)
