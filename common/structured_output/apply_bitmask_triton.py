"""The batch's token bitmask applied to its logits in one Triton kernel (CUDA).

Same signature and result as apply_bitmask.apply_token_bitmask_ (its torch reference):
logits[indices[i], t] = -inf wherever bit t of bitmask[i] is 0, tokens past the bitmask's
width disallowed. One program per (constrained row, block of the vocabulary): it reads the
row's words once, unpacks the bits in registers and stores -inf only where a token is
forbidden, so an allowed token's logit is never written and unconstrained rows are never
read. The torch path takes six kernels and a [rows, vocab] bool tensor for the same work.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096  # tokens a program covers: 128 words of the bitmask


@triton.jit
def _apply_bitmask_kernel(
    logits_ptr,
    logits_stride,
    bitmask_ptr,
    bitmask_stride,
    indices_ptr,
    vocab,
    num_words,
    HAS_INDICES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    tokens = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    target = tl.load(indices_ptr + row).to(tl.int64) if HAS_INDICES else row.to(tl.int64)
    word = tokens // 32
    in_vocab = tokens < vocab
    words = tl.load(bitmask_ptr + row * bitmask_stride + word, mask=in_vocab & (word < num_words), other=0)
    allowed = ((words >> (tokens % 32)) & 1) != 0
    minus_inf = tl.full([BLOCK], float("-inf"), tl.float32).to(logits_ptr.dtype.element_ty)
    tl.store(logits_ptr + target * logits_stride + tokens, minus_inf, mask=in_vocab & ~allowed)


def apply_token_bitmask_triton_(
    logits: torch.Tensor, bitmask: torch.Tensor, indices: torch.Tensor | None = None
) -> None:
    """In place, on the logits' CUDA device; the caller (apply_token_bitmask_) has checked
    the shapes and moved bitmask and indices to the device."""
    rows, vocab = bitmask.shape[0], logits.shape[1]
    if rows == 0:
        return
    if logits.stride(1) != 1 or bitmask.stride(1) != 1:
        raise ValueError("the bitmask kernel needs rows of contiguous logits and words")
    grid = (rows, triton.cdiv(vocab, BLOCK))
    _apply_bitmask_kernel[grid](
        logits,
        logits.stride(0),
        bitmask,
        bitmask.stride(0),
        indices if indices is not None else bitmask,  # unread without indices
        vocab,
        bitmask.shape[1],
        HAS_INDICES=indices is not None,
        BLOCK=BLOCK,
    )
