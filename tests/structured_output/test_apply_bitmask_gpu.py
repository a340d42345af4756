"""The bitmask kernel on a CUDA device gives its torch reference's logits bit for bit:
rows by index or all of them, vocabularies off the 32-token grid, a bitmask narrower
than the logits, fp32 and bf16."""

from __future__ import annotations

import pytest
import torch

from common.structured_output import apply_bitmask
from common.structured_output.apply_bitmask import apply_token_bitmask_

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _both(logits, bitmask, indices, monkeypatch):
    kernel = logits.clone()
    apply_token_bitmask_(kernel, bitmask, indices)
    reference = logits.clone()
    monkeypatch.setattr(apply_bitmask, "USE_TRITON_KERNEL", False)
    apply_token_bitmask_(reference, bitmask, indices)
    monkeypatch.setattr(apply_bitmask, "USE_TRITON_KERNEL", True)
    return kernel, reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("batch", "rows", "vocab", "words"), [
    (64, 64, 128256, 4008), (64, 17, 128256, 4008), (5, 3, 100, 4), (8, 8, 49152, 1536), (4, 2, 49160, 1536),
])  # fmt: skip
def test_the_kernel_gives_the_reference_logits(batch, rows, vocab, words, dtype, monkeypatch):
    gen = torch.Generator(device="cuda").manual_seed(vocab + rows)
    logits = torch.randn(batch, vocab, device="cuda", generator=gen).to(dtype)
    bitmask = torch.randint(
        -(2**31), 2**31 - 1, (rows, words), device="cuda", generator=gen, dtype=torch.int32
    )
    bitmask[0] = -1  # a row that allows everything
    if rows > 1:
        bitmask[1] = 0  # one that allows nothing
    indices = None if rows == batch else torch.randperm(batch, device="cuda", generator=gen)[:rows]
    kernel, reference = _both(logits, bitmask, indices, monkeypatch)
    assert torch.equal(kernel, reference)
    assert torch.isinf(kernel).any() and not torch.isinf(logits).any()
