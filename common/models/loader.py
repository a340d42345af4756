"""Build a model from a ModelSource: config, parameters on the target device, weights.

The parameters are allocated uninitialized on the target device in the target dtype and
filled tensor by tensor, so loading never holds a second copy of the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch

from common.config.checkpoint_quantization import checkpoint_fp8_scheme
from common.distributed.group import TensorParallelGroup
from common.distributed.shard_plan import plan_shards
from common.gguf_file import open_gguf
from common.model_files import ModelSource
from common.models.config import ModelConfig, load_model_config
from common.models.llama import LlamaForCausalLM
from common.models.parallel_layers import TensorParallelLlamaForCausalLM
from common.models.weights_dummy import fill_dummy_weights
from common.models.weights_fp8 import dense_weights, load_fp8_linears, quantize_linears
from common.models.weights_gguf import iter_gguf_weights, pack_gguf_linears
from common.models.weights_safetensors import iter_safetensors_weights

__all__ = [
    "LOAD_FORMATS",
    "load_model",
    "load_model_config",
    "load_weights",
    "resolve_dtype",
    "source_load_format",
]

LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
# Saved with the model by older converters; derived here, never loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def resolve_dtype(config_dtype: str | None, requested: str, device: torch.device | str) -> torch.dtype:
    """The compute dtype for --dtype `requested` on `device`.

    "auto" is float32 on CPU (where transformers' fp32 outputs are the reference); on a
    GPU it follows vLLM: bfloat16 for bfloat16 models, float16 for float32/float16 ones.
    """
    if requested != "auto":
        if requested not in _DTYPES:
            raise ValueError(f"--dtype {requested!r} is not one of auto, {', '.join(_DTYPES)}")
        return _DTYPES[requested]
    if torch.device(device).type == "cpu":
        return torch.float32
    return torch.bfloat16 if _DTYPES.get(config_dtype or "") == torch.bfloat16 else torch.float16


def load_model(
    source: ModelSource,
    *,
    load_format: str = "auto",
    dtype: torch.dtype | str,
    device: torch.device | str,
    attn_backend,
    hf_config_path: str | None = None,
    seed: int = 0,
    tp_group: TensorParallelGroup | None = None,
    quantization: str | None = None,
) -> tuple[LlamaForCausalLM, ModelConfig]:
    """The model of `source` with its weights, ready for forward(); and its config.

    With `tp_group`, the part of the model that rank holds (parallel_layers.py), its
    weights read as slices of the checkpoint's tensors; every rank of the group calls
    this at the same time. The config returned is the whole model's. quantization "gguf"
    keeps a GGUF's Q4_0/Q4_1/Q8_0 matmul weights quantized (CPU, one rank: see
    common/config/quantization.py); "fp8" keeps the linear layers' weights in fp8, as an fp8
    checkpoint stores them or quantized at load (one rank); None loads every weight densely
    in `dtype`, an fp8 checkpoint's dequantized.
    """
    fmt = source_load_format(source, load_format)
    config = load_model_config(source, hf_config_path)
    if isinstance(dtype, str):
        dtype = resolve_dtype(config.torch_dtype, dtype, device)
    with torch.device(device), _default_dtype(dtype):
        if tp_group is None:
            model = LlamaForCausalLM(config, attn_backend)
        else:
            shard = plan_shards(config, tp_group.size)[tp_group.rank]
            model = TensorParallelLlamaForCausalLM(config, attn_backend, tp_group, shard)
    shards = model.weight_shards() if tp_group is not None else None
    if quantization not in (None, "gguf", "fp8") or (quantization == "gguf" and fmt != "gguf"):
        raise ValueError(f"quantization {quantization!r} does not apply to a {fmt} model")
    # fp8 (common/models/weights_fp8.py): stored so by the checkpoint, or quantized below
    fp8_stored = fmt == "safetensors" and checkpoint_fp8_scheme(config.extra) is not None
    if (quantization == "fp8" or fp8_stored) and tp_group is not None:
        raise ValueError("fp8 weights load on one rank only; pass --tensor-parallel-size 1")
    if fmt == "dummy":
        fill_dummy_weights(model, seed)
        if tp_group is not None:
            model.broadcast_replicated()
    elif fmt == "gguf":
        reader = open_gguf(source.path)
        # The tensor layout comes from the file even when --hf-config-path gave the config.
        file_config = ModelConfig.from_gguf(reader)
        packed: set[str] = set()
        if quantization == "gguf":
            if tp_group is not None or torch.device(device).type != "cpu":
                raise ValueError("GGUF blocks are kept quantized on the CPU, on one rank only")
            packed = pack_gguf_linears(model, reader, file_config)
        load_weights(model, iter_gguf_weights(reader, file_config, shards, skip=packed), preloaded=packed)
    elif fp8_stored:
        _load_fp8_checkpoint(model, source.path, config, keep=quantization == "fp8")
    else:
        load_weights(model, iter_safetensors_weights(source.path, shards))
    if quantization == "fp8" and not fp8_stored:
        quantize_linears(model)  # dynamic quantization of the dense weights just loaded
    return model.eval(), config


def _load_fp8_checkpoint(model: LlamaForCausalLM, folder, config: ModelConfig, keep: bool) -> None:
    """An fp8 checkpoint's linear layers kept in fp8 (`keep`) or dequantized to the model
    dtype (--quantization none); its other tensors loaded densely."""
    loaded, read = load_fp8_linears(model, folder, checkpoint_fp8_scheme(config.extra), keep)
    load_weights(model, dense_weights(iter_safetensors_weights(folder, skip=read)), preloaded=loaded)


def load_weights(
    model: LlamaForCausalLM, weights: Iterable[tuple[str, torch.Tensor]], preloaded: Iterable[str] = ()
) -> None:
    """Copy Hugging Face-named tensors into the model; every weight must be among them or
    among `preloaded` (kept quantized by the caller)."""
    targets = model.weight_targets()
    loaded: set[str] = set(preloaded)
    unexpected: list[str] = []
    with torch.no_grad():
        for name, tensor in weights:
            target = targets.get(name)
            if target is None:
                if not _ignorable(name, model.config):
                    unexpected.append(name)
                continue
            if target.shape != tensor.shape:
                raise ValueError(
                    f"weight {name} has shape {tuple(tensor.shape)}, the config needs "
                    f"{tuple(target.shape)}; config.json and the weights do not belong together"
                )
            target.copy_(tensor)
            loaded.add(name)
    missing = sorted(set(targets) - loaded, key=_natural_key)
    if missing or unexpected:
        raise ValueError(
            f"the weights do not match {model.config.architecture}: "
            + "; ".join(
                f"{what} {len(names)} tensor(s): {_sample(names)}"
                for what, names in (("missing", missing), ("unexpected", unexpected))
                if names
            )
            + "; check that config.json and the weights belong to the same model"
        )


def _ignorable(name: str, config: ModelConfig) -> bool:
    if name.endswith(_IGNORED_SUFFIXES):
        return True
    # Some checkpoints of tied models still ship the (identical) LM head.
    return name == "lm_head.weight" and config.tie_word_embeddings


def source_load_format(source: ModelSource, load_format: str) -> str:
    """The format --load-format resolves to for `source` ("gguf", "safetensors" or "dummy")."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"--load-format {load_format!r} is not one of {', '.join(LOAD_FORMATS)}")
    if load_format == "auto":
        return "gguf" if source.kind == "gguf" else "safetensors"
    if load_format == "gguf" and source.kind != "gguf":
        raise ValueError(f"--load-format gguf needs a .gguf file; {source.path} is a folder")
    if load_format == "safetensors" and source.kind != "hf_dir":
        raise ValueError(f"--load-format safetensors needs a model folder; {source.path} is a GGUF file")
    return load_format


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _natural_key(name: str) -> list[tuple[int, str]]:
    # layers.2 before layers.10
    return [(int(p), "") if p.isdigit() else (-1, p) for p in name.split(".")]


def _sample(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
