"""LoRA adapters made with peft on the embedded model, saved as PEFT folders, for the
LoRA tests: different ranks, alphas and target modules, every B non-zero."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    r: int
    alpha: int
    targets: tuple[str, ...]
    rslora: bool = False
    seed: int = 0


# rank 8 on two attention projections; rank 16 with rslora on all seven; rank 4 on
# three of the four output-side projections (o, gate, down: up left as the base)
SPECS = (
    AdapterSpec("sql", 8, 16, ("q_proj", "v_proj"), seed=1),
    AdapterSpec(
        "chat",
        16,
        32,
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        True,
        seed=2,
    ),
    AdapterSpec("terse", 4, 8, ("o_proj", "gate_proj", "down_proj"), seed=3),
)


def make_adapters(
    hf_model, root: Path, specs=SPECS, a_std: float = 0.05, b_std: float = 0.05
) -> dict[str, Path]:
    """Save one PEFT folder per spec under `root` (name -> folder); `hf_model` is not changed.

    peft starts B at zero (an adapter that changes nothing); these draw A and B from
    N(0, std) with a seed per adapter, large enough to change greedy answers."""
    import peft

    work = copy.deepcopy(hf_model)
    folders = {}
    for spec in specs:
        config = peft.LoraConfig(
            r=spec.r,
            lora_alpha=spec.alpha,
            target_modules=list(spec.targets),
            use_rslora=spec.rslora,
            lora_dropout=0.0,
            bias="none",
            init_lora_weights=False,
        )
        model = peft.get_peft_model(work, config)
        generator = torch.Generator().manual_seed(spec.seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".lora_A." in name or ".lora_B." in name:
                    std = a_std if ".lora_A." in name else b_std
                    param.copy_(torch.randn(param.shape, generator=generator) * std)
        folder = root / spec.name
        model.save_pretrained(str(folder), safe_serialization=True)
        folders[spec.name] = folder
        work = model.unload()  # the base model again, its layers unchanged
    return folders
