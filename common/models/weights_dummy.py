"""Random weights at a model's real shapes (--load-format dummy), for benchmarks.

Filled in place on the target device in the target dtype, so an 8B model takes seconds
on a GPU. The same seed on the same device gives the same weights.
"""

from __future__ import annotations

import torch
from torch import nn

_INIT_STD = 0.02


def fill_dummy_weights(model: nn.Module, seed: int) -> None:
    """Norm weights stay 1; every other weight and bias is drawn from N(0, 0.02^2)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, _INIT_STD, generator=generator)
