"""Applying a batch's token bitmask to its logits: disallowed tokens become -inf.

The bitmask holds rows only for constrained sequences; `indices` says which logits row
each belongs to (vLLM's and xgrammar's convention), so unconstrained rows are never
read or written. On CUDA one Triton kernel does it (apply_bitmask_triton.py); elsewhere,
and as that kernel's reference, bits are unpacked and applied in one masked_fill over the
constrained rows. Tokens past the bitmask's width (logits padded beyond the vocabulary)
are disallowed; bits past the logits' width are ignored.
"""

from __future__ import annotations

import torch

_SHIFTS: dict[torch.device, torch.Tensor] = {}
# the Triton kernel on CUDA; False: the torch path there too (the tests and benchmark compare them)
USE_TRITON_KERNEL = True


def apply_token_bitmask_(
    logits: torch.Tensor, bitmask: torch.Tensor, indices: torch.Tensor | None = None
) -> None:
    """Set logits[indices[i], t] to -inf wherever bit t of bitmask[i] is 0, in place.

    logits: [batch, vocab] floating; bitmask: [rows, ceil(vocab/32)] int32 (on any device;
    moved to the logits'); indices: [rows] logits rows, or None when rows == batch.
    """
    if logits.dim() != 2 or bitmask.dim() != 2 or bitmask.dtype != torch.int32:
        raise ValueError(
            f"need 2-D logits and a 2-D int32 bitmask, got logits {tuple(logits.shape)} and "
            f"bitmask {tuple(bitmask.shape)} {bitmask.dtype}"
        )
    rows = bitmask.shape[0]
    if indices is None and rows != logits.shape[0]:
        raise ValueError(f"bitmask has {rows} rows for {logits.shape[0]} logits rows; pass indices")
    if indices is not None and indices.shape != (rows,):
        raise ValueError(
            f"indices must be a 1-D tensor of {rows} logits rows, got shape {tuple(indices.shape)}"
        )
    if rows == 0:
        return
    if logits.is_cuda and USE_TRITON_KERNEL:
        from common.structured_output.apply_bitmask_triton import apply_token_bitmask_triton_

        apply_token_bitmask_triton_(
            logits,
            bitmask.to(logits.device, non_blocking=True),
            None if indices is None else indices.to(logits.device, non_blocking=True),
        )
        return
    vocab = logits.shape[1]
    allowed = _unpack(bitmask.to(logits.device, non_blocking=True), vocab)
    if indices is None:
        logits.masked_fill_(~allowed, float("-inf"))
        return
    indices = indices.to(logits.device)
    logits[indices] = logits[indices].masked_fill(~allowed, float("-inf"))


def _unpack(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """[rows, words] int32 → [rows, vocab] bool: bit j of word i is token 32*i + j."""
    shifts = _SHIFTS.get(bitmask.device)
    if shifts is None:
        shifts = _SHIFTS[bitmask.device] = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)
    if bits.shape[1] >= vocab:
        return bits[:, :vocab]
    pad = torch.zeros(bits.shape[0], vocab - bits.shape[1], dtype=torch.bool, device=bits.device)
    return torch.cat([bits, pad], dim=1)
