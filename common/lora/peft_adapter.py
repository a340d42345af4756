"""Reading a LoRA adapter from a PEFT folder, checked against the model before anything is kept.

A PEFT folder holds `adapter_config.json` (peft_type LORA, r, lora_alpha, target_modules,
use_rslora, ...) and `adapter_model.safetensors` with, per adapted linear layer,
`base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_A.weight` [r, in] and
`...lora_B.weight` [out, r]. Only safetensors are read (a `.bin` adapter would need pickle).

Every check runs before the adapter is returned, so a refused adapter leaves nothing
loaded: a missing or malformed folder, a rank above --max-lora-rank, a target module the
model lacks, and what pdserve does not implement (DoRA, biases, modules_to_save,
per-module rank or alpha patterns) each raise LoRAError with status 400 saying which.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# The linear layers LoRA may adapt, as Hugging Face names them, and where each one sits.
TARGET_MODULES = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
_CONFIG = "adapter_config.json"
_WEIGHTS = "adapter_model.safetensors"
_KEY_RE = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.([a-z_]+)\.lora_([AB])(?:\.default)?\.weight$"
)


class LoRAError(ValueError):
    """An adapter that cannot be served; `status` is the HTTP status a router answers with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class PeftAdapter:
    """An adapter read from its folder, on the host: weights[(layer, module)] = (A [r, in], B [out, r])."""

    name: str
    path: str
    rank: int
    scaling: float  # lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def target_modules(self) -> set[str]:
        return {module for _, module in self.weights}

    @property
    def num_bytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values())


def module_shapes(model_config) -> dict[str, tuple[int, int]]:
    """(in, out) features of each adaptable module of the whole (unsharded) model."""
    c = model_config
    hidden, q, kv = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    inter = c.intermediate_size
    return {
        "q_proj": (hidden, q),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (q, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def load_peft_adapter(
    name: str, path: str, model_config, *, max_rank: int, dtype: torch.dtype
) -> PeftAdapter:
    """The adapter in folder `path`, its tensors in `dtype` on the host; LoRAError when it
    cannot be served on this model with this --max-lora-rank."""
    folder = Path(path)
    if not folder.is_dir():
        raise LoRAError(f"LoRA adapter {name!r}: {path} is not a folder; give the folder holding {_CONFIG}")
    config = _read_config(name, folder / _CONFIG)
    rank, scaling = _rank_and_scaling(name, config, max_rank)
    _check_target_modules(name, config.get("target_modules"))
    weights = _read_weights(name, folder, model_config, rank)
    return PeftAdapter(
        name,
        path,
        rank,
        scaling,
        {key: (a.to(dtype).contiguous(), b.to(dtype).contiguous()) for key, (a, b) in weights.items()},
    )


def _read_config(name: str, file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise LoRAError(
            f"LoRA adapter {name!r}: {file} is missing; a PEFT adapter folder holds {_CONFIG} and {_WEIGHTS}"
        )
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoRAError(f"LoRA adapter {name!r}: {file} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise LoRAError(f"LoRA adapter {name!r}: {file} must hold a JSON object")
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise LoRAError(
            f"LoRA adapter {name!r}: peft_type {peft_type!r} is not supported; only LORA adapters are"
        )
    refused = {
        "use_dora": "DoRA adapters are not supported",
        "modules_to_save": "modules_to_save (fully trained extra layers) are not supported",
        "rank_pattern": "per-module ranks (rank_pattern) are not supported",
        "alpha_pattern": "per-module alphas (alpha_pattern) are not supported",
        "layers_to_transform": "layers_to_transform is not supported; adapt every layer",
        "fan_in_fan_out": "fan_in_fan_out weights (Conv1D layers) are not supported",
    }
    for key, why in refused.items():
        if config.get(key):
            raise LoRAError(f"LoRA adapter {name!r}: {why} ({key} = {config[key]!r} in {_CONFIG})")
    if config.get("bias", "none") != "none":
        raise LoRAError(
            f'LoRA adapter {name!r}: bias {config["bias"]!r} is not supported; only bias "none" is'
        )
    return config


def _rank_and_scaling(name: str, config: dict[str, Any], max_rank: int) -> tuple[int, float]:
    rank, alpha = config.get("r"), config.get("lora_alpha", config.get("r"))
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise LoRAError(f"LoRA adapter {name!r}: r must be a positive int in {_CONFIG}, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise LoRAError(f"LoRA adapter {name!r}: lora_alpha must be a number in {_CONFIG}, got {alpha!r}")
    if rank > max_rank:
        raise LoRAError(
            f"LoRA adapter {name!r} has rank {rank}, more than --max-lora-rank {max_rank}; "
            f"start the workers with --max-lora-rank {rank} or more"
        )
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return rank, float(scaling)


def _check_target_modules(name: str, targets: Any) -> None:
    """target_modules as a list must name modules the model has; a regex string is checked
    through the weights' names instead."""
    if isinstance(targets, str) or targets is None:
        return
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise LoRAError(
            f"LoRA adapter {name!r}: target_modules must be a list of module names or a regex string"
        )
    unknown = sorted(t.rsplit(".", 1)[-1] for t in targets if t.rsplit(".", 1)[-1] not in TARGET_MODULES)
    if unknown:
        raise LoRAError(
            f"LoRA adapter {name!r} targets {', '.join(unknown)}, which the model has no LoRA layer for; "
            f"the adaptable modules are {', '.join(TARGET_MODULES)}"
        )


def _read_weights(
    name: str, folder: Path, model_config, rank: int
) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    file = folder / _WEIGHTS
    if not file.is_file():
        raise LoRAError(
            f"LoRA adapter {name!r}: {file} is missing (pdserve reads safetensors only; "
            "save the adapter with safe_serialization=True)"
        )
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                match = _KEY_RE.match(key)
                if match is None:
                    raise LoRAError(
                        f"LoRA adapter {name!r}: tensor {key!r} is not a LoRA A/B weight of a decoder "
                        f"layer's {'/'.join(TARGET_MODULES)}; pdserve cannot apply it"
                    )
                layer, block, module, half = int(match[1]), match[2], match[3], match[4]
                if TARGET_MODULES.get(module) != block:
                    raise LoRAError(
                        f"LoRA adapter {name!r} targets {block}.{module}, which the model has no LoRA layer for; "
                        f"the adaptable modules are {', '.join(TARGET_MODULES)}"
                    )
                halves.setdefault((layer, module), {})[half] = f.get_tensor(key)
    except SafetensorError as exc:
        raise LoRAError(f"LoRA adapter {name!r}: {file} is not a readable safetensors file ({exc})") from None
    if not halves:
        raise LoRAError(f"LoRA adapter {name!r}: {file} holds no LoRA weights")
    shapes = module_shapes(model_config)
    weights = {}
    for (layer, module), pair in sorted(halves.items()):
        where = f"layer {layer} {module}"
        if not 0 <= layer < model_config.num_hidden_layers:
            raise LoRAError(
                f"LoRA adapter {name!r}: {where} is past the model's {model_config.num_hidden_layers} layers"
            )
        if set(pair) != {"A", "B"}:
            raise LoRAError(
                f"LoRA adapter {name!r}: {where} has lora_{'A' if 'A' in pair else 'B'} without its pair"
            )
        in_features, out_features = shapes[module]
        a, b = pair["A"], pair["B"]
        if tuple(a.shape) != (rank, in_features) or tuple(b.shape) != (out_features, rank):
            raise LoRAError(
                f"LoRA adapter {name!r}: {where} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                f"this model with r = {rank} needs {(rank, in_features)} and {(out_features, rank)} "
                "(was the adapter trained for another base model?)"
            )
        weights[(layer, module)] = (a, b)
    return weights
