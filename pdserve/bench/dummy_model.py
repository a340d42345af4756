"""The model a benchmark runs at real shapes without real weights: a bundled config's name
(common/models/configs, e.g. llama-3-8b, qwen3-30b-a3b), a config.json, or a model folder (one
written by `pdserve bench make-model`), loaded with dummy weights, in fp8 with
`--quantization fp8`, and cut to its first layers with `--num-layers` (a model too large for
the device, or a check on the CPU)."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from common.models.config import ModelConfig


def add_weight_args(parser: argparse.ArgumentParser) -> None:
    """--quantization, --num-layers: how the bench's model holds its weights, and how many
    of its layers it keeps."""
    parser.add_argument(
        "--quantization",
        "-q",
        choices=["fp8"],
        default=None,
        help="fp8: the linear layers' weights quantized at load as `pdserve serve -q fp8` does (per-row "
        "scales; embedding, LM head, norms and a mixture-of-experts model's experts stay in --dtype); "
        "the floors count those bytes. Default: every weight in --dtype",
    )
    parser.add_argument(
        "--num-layers",
        type=int,
        default=None,
        help="keep only the first N decoder layers (widths unchanged): a model too large for the device, "
        "or a quick check; every figure is then that of the N-layer model",
    )


def add_dummy_model_args(parser: argparse.ArgumentParser) -> None:
    """--model-config, --dtype, --kv-cache-dtype, --device, and the weight flags: the model a
    bench builds from a config and where it runs (and measures the device's rates)."""
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
    add_weight_args(parser)


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


def read_model_config(name_or_path: str, num_layers: int | None = None) -> ModelConfig:
    """The ModelConfig of a bundled name, config.json or model folder (torch-free), cut to
    `num_layers` layers if given."""
    raw = json.loads(config_path(name_or_path).read_text())
    return ModelConfig.from_hf_config(with_num_layers(raw, num_layers))


def with_num_layers(raw: dict[str, Any], num_layers: int | None) -> dict[str, Any]:
    """A config.json dict with its first `num_layers` decoder layers only (None: unchanged)."""
    if num_layers is None:
        return raw
    layers = raw.get("num_hidden_layers")
    if not isinstance(layers, int) or not 1 <= num_layers <= layers:
        raise ValueError(
            f"--num-layers {num_layers}: the config has {layers} layers; pass a number from 1 to {layers}"
        )
    return {**raw, "num_hidden_layers": num_layers}


def load_dummy_model(
    name_or_path: str,
    *,
    dtype: str,
    device: Any,
    seed: int,
    min_positions: int = 0,
    kv_cache_dtype: str = "auto",
    quantization: str | None = None,
    num_layers: int | None = None,
) -> tuple[Any, ModelConfig, str]:
    """(model, its config, a note) with dummy weights on `device`.

    dtype: as --dtype (auto: float32 on CPU, the config's on a GPU). min_positions: the
    longest sequence the run needs (the engine's max_model_len). A config whose context is shorter
    gets max_position_embeddings raised to it (the note says so): with dummy weights that
    only lengthens the RoPE tables, and every figure of the run stays at the model's shapes.
    quantization "fp8": the linears quantized after the dummy fill, as serving does.
    num_layers: the config cut to its first layers (the note says so)."""
    from common.attention.backend_select import get_attention_backend
    from common.model_files import ModelSource
    from common.models.loader import load_model

    path = config_path(name_or_path)
    original = json.loads(path.read_text())
    raw = with_num_layers(original, num_layers)
    notes = []
    if raw is not original:
        notes.append(f"{num_layers} of the config's {original['num_hidden_layers']} layers")
    with tempfile.TemporaryDirectory() as scratch:
        context = ModelConfig.from_hf_config(raw).max_position_embeddings
        if min_positions > context:
            raw = {**raw, "max_position_embeddings": min_positions}
            notes.append(
                f"max_position_embeddings raised from {context} to {min_positions} to fit the longest run"
            )
        if raw is not original:
            path = Path(scratch) / "config.json"
            path.write_text(json.dumps(raw))
        model, model_config = load_model(
            ModelSource("hf_dir", path.parent, path.stem),
            load_format="dummy",
            dtype=dtype,
            device=device,
            attn_backend=get_attention_backend(device, kv_cache_dtype, max(min_positions, context)),
            hf_config_path=str(path),
            seed=seed,
            quantization=quantization,
        )
    return model, model_config, "; ".join(notes)
