"""What the LoRA kernel tests share: a step's LoRABatch from each token's slot, the relative
error against a float64 reference, and a run with unwritten elements made visible."""

from __future__ import annotations

import torch

from common.lora.lora_ops import LoRABatch


def make_batch(token_slots: list[int], ranks: list[int], device: torch.device) -> LoRABatch:
    """The LoRABatch of a step whose token t uses slot token_slots[t] (-1: base model);
    ranks[s] is slot s's adapter rank."""
    by_slot = [[t for t, s in enumerate(token_slots) if s == slot] for slot in range(len(ranks))]
    base = [t for t, s in enumerate(token_slots) if s < 0]
    starts = [0]
    for rows in by_slot:
        starts.append(starts[-1] + len(rows))
    return LoRABatch(
        token_slots=torch.tensor(token_slots, dtype=torch.int32, device=device),
        sorted_tokens=torch.tensor(sum(by_slot, []) + base, dtype=torch.int32, device=device),
        slot_starts=torch.tensor(starts, dtype=torch.int32, device=device),
        groups=[
            (slot, ranks[slot], torch.tensor(rows, dtype=torch.long, device=device))
            for slot, rows in enumerate(by_slot)
        ],
    )


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30))


def poisoned(fn):
    """fn() with torch.empty filling floats with NaN, so an element the kernels leave
    unwritten shows."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return fn()
    finally:
        torch.use_deterministic_algorithms(was)
