"""The model's generation_config.json as request defaults (torch-free).

The engine, `run-batch` and the router read it the same way, so a request gets the
same defaults whichever of them validates it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# generation_config.json keys taken as request defaults, under SamplingParams' names
GENERATION_DEFAULT_KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
    "max_tokens": "max_tokens",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}


def read_generation_config(setting: str, model_folder: Path | None) -> dict[str, Any]:
    """generation_config.json as --generation-config says: "auto" the model folder's (a GGUF
    file has none), "vllm" none, anything else a folder holding one."""
    if setting == "vllm":
        return {}
    if setting == "auto":
        if model_folder is None:
            return {}
        folder = model_folder
    else:
        folder = Path(setting).expanduser()
        if not folder.is_dir():
            raise ValueError(
                f"--generation-config {setting}: not a folder; pass auto, vllm, or a folder holding "
                "generation_config.json"
            )
    path = folder / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); fix it or pass --generation-config vllm") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object; fix it or pass --generation-config vllm")
    return data


def sampling_defaults(generation_config: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """The generation config's sampling defaults, then --override-generation-config, under
    SamplingParams' field names (max_new_tokens becomes max_tokens)."""
    defaults: dict[str, Any] = {}
    for values in (generation_config, overrides or {}):
        for key, value in values.items():
            name = GENERATION_DEFAULT_KEYS.get(key)
            if name is not None and value is not None:
                defaults[name] = value
    return defaults


def read_chat_template(value: str | None) -> str | None:
    """--chat-template: a file's contents, or the template itself."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"--chat-template {value}: cannot read the file ({exc})") from None
    if "{" not in value:
        raise ValueError(f"--chat-template {value}: no such file, and not a Jinja template either")
    return value
