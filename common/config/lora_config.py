"""LoRA flags: vLLM's `--enable-lora`, `--lora-modules`, `--max-loras`, `--max-lora-rank`,
`--max-cpu-loras`, `--lora-dtype`, `--fully-sharded-loras`, with vLLM's names, defaults
and checks, read when the command line is parsed.

The router and the workers both take them (`pdserve serve` hands them to both): the
router serves the adapters of `--lora-modules` under their names (`/v1/models`, a
request's `model`) and sends each request's adapter (name, path, id) to the worker that
runs it; a worker loads an adapter from its path the first time a request or the router
names it, keeps up to `--max-cpu-loras` of them in host memory and `--max-loras` in the
device slots one forward pass reads.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from typing import Any

from common.config.arg_types import choice, int_at_least

# vLLM's choices for --max-lora-rank
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
LORA_DTYPES = ("auto", "bfloat16", "float16")
# The environment variable under which vLLM allows /v1/load_lora_adapter and
# /v1/unload_lora_adapter; the router takes it or --allow-runtime-lora-updating.
RUNTIME_LORA_UPDATING_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"


@dataclass(frozen=True)
class LoRAModulePath:
    """One `--lora-modules` entry: serve the adapter in `path` as model `name`, whose
    parent in /v1/models is `base_model_name` (default: the first served model name)."""

    name: str
    path: str
    base_model_name: str | None = None

    @classmethod
    def from_dict(cls, data: Any) -> LoRAModulePath:
        if not isinstance(data, dict):
            raise ValueError(f"a LoRA module must be a JSON object, got {data!r}")
        unknown = sorted(set(data) - {"name", "path", "base_model_name"})
        if unknown:
            raise ValueError(
                f"LoRA module {data!r}: unknown fields {unknown}; known: name, path, base_model_name"
            )
        for key in ("name", "path"):
            if not isinstance(data.get(key), str) or not data[key]:
                raise ValueError(f"LoRA module {data!r}: {key!r} must be a non-empty string")
        base = data.get("base_model_name")
        if base is not None and not isinstance(base, str):
            raise ValueError(f"LoRA module {data!r}: 'base_model_name' must be a string")
        return cls(data["name"], data["path"], base)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "path": self.path}
        if self.base_model_name is not None:
            out["base_model_name"] = self.base_model_name
        return out


def parse_lora_module(text: str) -> list[LoRAModulePath]:
    """One `--lora-modules` argument: `name=path`, a JSON object or a JSON list of them."""
    text = text.strip()
    if text.startswith(("{", "[")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"invalid JSON {text!r}: {exc.msg}") from None
        items = data if isinstance(data, list) else [data]
        try:
            return [LoRAModulePath.from_dict(item) for item in items]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(
            f"invalid LoRA module {text!r}: give name=path or a JSON object "
            '{"name": ..., "path": ..., "base_model_name": ...}'
        )
    return [LoRAModulePath(name, path)]


class _LoRAModulesAction(argparse.Action):
    """Collects every entry of every `--lora-modules` given, in order."""

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[no-untyped-def]
        collected = list(getattr(namespace, self.dest, None) or [])
        for value in values:
            collected.extend(value)
        setattr(namespace, self.dest, collected)


@dataclass
class LoRAConfig:
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None  # None: max_loras
    lora_dtype: str = "auto"  # auto (the model's dtype) | bfloat16 | float16
    fully_sharded_loras: bool = False
    lora_modules: list[LoRAModulePath] = field(default_factory=list)

    def validate(self) -> None:
        if self.max_loras < 1:
            raise ValueError(f"--max-loras must be at least 1, got {self.max_loras}")
        if self.max_lora_rank not in LORA_RANKS:
            raise ValueError(
                f"--max-lora-rank {self.max_lora_rank} is not one of {', '.join(map(str, LORA_RANKS))}"
            )
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(
                f"--max-cpu-loras ({self.max_cpu_loras}) must be at least --max-loras ({self.max_loras})"
            )
        if self.lora_dtype not in LORA_DTYPES:
            raise ValueError(f"--lora-dtype {self.lora_dtype!r} is not one of {', '.join(LORA_DTYPES)}")
        if self.lora_modules and not self.enable_lora:
            raise ValueError("--lora-modules needs --enable-lora")
        names = [m.name for m in self.lora_modules]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"--lora-modules names {repeated} more than once; give each adapter one name")

    @property
    def cpu_capacity(self) -> int:
        """How many adapters a worker keeps in host memory."""
        return self.max_cpu_loras if self.max_cpu_loras is not None else self.max_loras

    def to_dict(self) -> dict[str, Any]:
        return {
            "enable_lora": self.enable_lora,
            "max_loras": self.max_loras,
            "max_lora_rank": self.max_lora_rank,
            "max_cpu_loras": self.max_cpu_loras,
            "lora_dtype": self.lora_dtype,
            "fully_sharded_loras": self.fully_sharded_loras,
            "lora_modules": [m.to_dict() for m in self.lora_modules],
        }


def add_lora_args(group: Any) -> None:
    """The LoRA flags (router and workers)."""
    group.add_argument(
        "--enable-lora",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="If True, enable handling of LoRA adapters: requests may name an adapter in `model`.",
    )
    group.add_argument(
        "--lora-modules",
        type=parse_lora_module,
        nargs="+",
        action=_LoRAModulesAction,
        default=None,
        metavar="NAME=PATH|JSON",
        help="LoRA module configurations in either 'name=path' format or JSON format or JSON list "
        "format. Example (old format): 'name=path' Example (new format): "
        '{"name": "name", "path": "lora_path", "base_model_name": "id"}. The path is a folder in '
        "PEFT's format (adapter_config.json, adapter_model.safetensors) that every worker can read.",
    )
    group.add_argument(
        "--max-loras",
        type=int_at_least(1),
        default=None,
        help="Max number of LoRAs in a single batch. (default: 1)",
    )
    group.add_argument(
        "--max-lora-rank",
        type=int,
        choices=LORA_RANKS,
        default=None,
        help="Max LoRA rank. (default: 16)",
    )
    group.add_argument(
        "--max-cpu-loras",
        type=int_at_least(1),
        default=None,
        help="Maximum number of LoRAs to store in CPU memory. Must be >= than max_loras. "
        "(default: max_loras)",
    )
    group.add_argument(
        "--lora-dtype",
        type=choice(LORA_DTYPES),
        choices=LORA_DTYPES,
        default=None,
        help="Data type for LoRA. If auto, will default to base model dtype. (default: auto)",
    )
    group.add_argument(
        "--fully-sharded-loras",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="By default, only half of the LoRA computation is sharded with tensor parallelism. "
        "Enabling this will use the fully sharded layers. At high sequence length, max rank or "
        "tensor parallel size, this is likely faster. (default: False)",
    )


def lora_config_from_args(ns: argparse.Namespace) -> LoRAConfig:
    """The LoRAConfig of parsed flags (unset flags keep their defaults), checked."""
    values: dict[str, Any] = {}
    for name in (
        "enable_lora",
        "max_loras",
        "max_lora_rank",
        "max_cpu_loras",
        "lora_dtype",
        "fully_sharded_loras",
    ):
        value = getattr(ns, name, None)
        if value is not None:
            values[name] = value
    modules = getattr(ns, "lora_modules", None)
    if modules:
        values["lora_modules"] = [
            m if isinstance(m, LoRAModulePath) else LoRAModulePath.from_dict(m) for m in modules
        ]
    config = LoRAConfig(**values)
    config.validate()
    return config
