"""Weights of a local Hugging Face folder: model.safetensors, or shards named by the index."""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from common.models.weights_shard import Shard

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


def safetensors_files(folder: Path) -> list[Path]:
    """The files holding the model's tensors, in a stable order."""
    index = folder / _INDEX
    if index.is_file():
        with open(index, encoding="utf-8") as fh:
            weight_map = json.load(fh)["weight_map"]
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{index} names shards that are not in the folder: {', '.join(missing)}; "
                "download the complete model"
            )
        return files
    if (folder / _SINGLE).is_file():
        return [folder / _SINGLE]
    files = sorted(folder.glob("model*.safetensors"))
    if files:
        return files
    raise FileNotFoundError(
        f"{folder} has no {_SINGLE} or {_INDEX}; pdserve loads safetensors only "
        "(convert .bin/.pt checkpoints to safetensors, or use a .gguf file)"
    )


def iter_safetensors_weights(
    folder: Path, shards: Mapping[str, Shard] | None = None, skip: Collection[str] = ()
) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, CPU tensor) for every tensor of the folder but those in `skip`
    (read by the caller already), one at a time; a tensor named in `shards` is read as that
    slice only (a tensor-parallel rank's part)."""
    shards = shards or {}
    for file in safetensors_files(Path(folder)):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name in skip:
                    continue
                shard = shards.get(name)
                if shard is None:
                    yield name, f.get_tensor(name)
                elif shard.dim == 0:
                    yield name, f.get_slice(name)[shard.start : shard.stop]
                else:
                    yield name, f.get_slice(name)[:, shard.start : shard.stop]
