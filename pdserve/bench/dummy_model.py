"""The model a benchmark runs at real shapes without real weights: a bundled config's name
(common/models/configs, e.g. llama-3-8b), a config.json, or a model folder (one written by
`pdserve bench make-model`), loaded with dummy weights."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from common.models.config import ModelConfig


def add_dummy_model_args(parser: argparse.ArgumentParser) -> None:
    """--model-config, --dtype, --kv-cache-dtype, --device: the model a bench builds from a
    config and where it runs (and measures the device's rates)."""
    parser.add_argument(
        "--model-config",
        "--model",
        dest="model_config",
        default="llama-3-8b",
        help="a bundled config name (common/models/configs), a config.json or a model folder "
        "(pdserve bench make-model DIR; its vocabulary is the embedded tokenizer's): the model's "
        "shapes, with dummy weights",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float16", "float32"],
        help="weight and activation dtype, and of the matmul whose rate is measured (auto: "
        "float32 on CPU, the config's on a GPU)",
    )
    parser.add_argument("--kv-cache-dtype", default="auto", help="auto (= --dtype) or fp8")
    parser.add_argument(
        "--device", default="auto", help="auto, cuda or cpu: where it runs and the rates are measured"
    )


def config_path(name_or_path: str) -> Path:
    """The config.json that `name_or_path` names: the file itself, the one in a folder, or
    a bundled config's."""
    from common.models.configs import bundled_config

    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} has no config.json; pass a model folder, a config.json or a bundled name"
            )
        return path / "config.json"
    return bundled_config(name_or_path)


def read_model_config(name_or_path: str) -> ModelConfig:
    """The ModelConfig of a bundled name, config.json or model folder (torch-free)."""
    return ModelConfig.from_hf_config(json.loads(config_path(name_or_path).read_text()))


def load_dummy_model(
    name_or_path: str,
    *,
    dtype: str,
    device: Any,
    seed: int,
    min_positions: int = 0,
    kv_cache_dtype: str = "auto",
) -> tuple[Any, ModelConfig, str]:
    """(model, its config, a note) with dummy weights on `device`.

    dtype: as --dtype (auto: float32 on CPU, the config's on a GPU). min_positions: the
    longest sequence the run needs (the engine's max_model_len). A config whose context is shorter
    gets max_position_embeddings raised to it (the note says so): with dummy weights that
    only lengthens the RoPE tables, and every figure of the run stays at the model's shapes."""
    from common.attention.backend_select import get_attention_backend
    from common.model_files import ModelSource
    from common.models.loader import load_model

    path = config_path(name_or_path)
    raw = json.loads(path.read_text())
    note = ""
    with tempfile.TemporaryDirectory() as scratch:
        context = ModelConfig.from_hf_config(raw).max_position_embeddings
        if min_positions > context:
            raw = {**raw, "max_position_embeddings": min_positions}
            path = Path(scratch) / "config.json"
            path.write_text(json.dumps(raw))
            note = f"max_position_embeddings raised from {context} to {min_positions} to fit the longest run"
        model, model_config = load_model(
            ModelSource("hf_dir", path.parent, path.stem),
            load_format="dummy",
            dtype=dtype,
            device=device,
            attn_backend=get_attention_backend(device, kv_cache_dtype, max(min_positions, context)),
            hf_config_path=str(path),
            seed=seed,
        )
    return model, model_config, note
