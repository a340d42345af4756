"""The batched LoRA matmuls, in torch: the reference of the Triton kernels
(lora_ops_triton.py) and the CPU path.

A step's tokens run under different adapters at once. Every LoRA-enabled linear layer
holds its adapters' weights stacked by device slot (common/lora/lora_layer.py):
    a [S, n * R, in]   the A matrices of the layer's n output bands (q, k, v for the fused
                       qkv projection; gate, up for gate_up; one for o and down), each padded
                       to R = --max-lora-rank rows
    b [S, out, R]      the B matrices, band j's rows reading shrink columns [j R, (j + 1) R)
    scales [S]         lora_alpha / r (or / sqrt(r) with rslora) of the adapter in the slot
and a step's LoRABatch says which slot each token uses (-1: the base model only).

    y[t, band j] += scales[s] * (x[t] @ a[s, jR:(j+1)R].T) @ b[s, band j].T,   s = slot of t

computed as a shrink (x -> [T, n R]) and an expand that adds into the base layer's output.
The sums follow peft's order (A, then B, then the scale), so fp32 results match it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LoRABatch:
    """Which adapter slot each token of a step uses.

    token_slots:   int32 [T], the slot of each packed token, -1 for base-model tokens
    sorted_tokens: int32 [T], token indices grouped by slot (slot 0's first, in order), the
                   base-model tokens after all of them
    slot_starts:   int32 [S + 1], slot s's tokens are sorted_tokens[slot_starts[s]:slot_starts[s + 1]]
    groups:        host side: (slot, rank, token indices) of every slot the step uses, the
                   torch path's loop; rank is the adapter's own r (<= R)
    """

    token_slots: torch.Tensor
    sorted_tokens: torch.Tensor
    slot_starts: torch.Tensor
    groups: list[tuple[int, int, torch.Tensor]]

    @property
    def num_tokens(self) -> int:
        return self.token_slots.shape[0]


def lora_shrink(x: torch.Tensor, a: torch.Tensor, batch: LoRABatch, num_bands: int) -> torch.Tensor:
    """x [T, in] @ each token's slot's A^T: [T, num_bands * R] in x's dtype, zero on the
    rows of base-model tokens."""
    tokens = x.shape[0]
    out = x.new_zeros(tokens, a.shape[1])
    max_rank = a.shape[1] // num_bands
    for slot, rank, rows in batch.groups:
        if rows.shape[0] == 0:
            continue
        a_slot = a[slot].view(num_bands, max_rank, -1)[:, :rank].reshape(num_bands * rank, -1)
        shrunk = x.index_select(0, rows) @ a_slot.T  # [rows, num_bands * rank]
        out.view(tokens, num_bands, max_rank)[rows, :, :rank] = shrunk.view(-1, num_bands, rank)
    return out


def lora_expand_add(
    y: torch.Tensor,
    shrunk: torch.Tensor,
    b: torch.Tensor,
    scales: torch.Tensor,
    bands: tuple[int, ...],
    batch: LoRABatch,
) -> None:
    """y [T, out] += scale * shrunk band j @ B band j^T for every band, each token with its
    slot's B; rows of base-model tokens are left as they are. `bands`: the output rows'
    band boundaries (0, ..., out); `scales` [S] float32."""
    num_bands = len(bands) - 1
    max_rank = b.shape[2]
    for slot, rank, rows in batch.groups:
        if rows.shape[0] == 0:
            continue
        s = shrunk.index_select(0, rows).view(-1, num_bands, max_rank)
        scale = float(scales[slot])
        delta = torch.empty(rows.shape[0], y.shape[1], dtype=y.dtype, device=y.device)
        for j in range(num_bands):
            lo, hi = bands[j], bands[j + 1]
            delta[:, lo:hi] = (s[:, j, :rank] @ b[slot, lo:hi, :rank].T) * scale
        y.index_add_(0, rows, delta)
