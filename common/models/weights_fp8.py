"""fp8 weights into a model's linear layers: quantized at load, or read from an fp8 checkpoint.

Only the layers `model.linear_sources()` lists (q/k/v, o, gate/up, down) and, quantized at
load, a mixture-of-experts layer's stacked experts become fp8; the embedding, the LM head,
the router and the norms stay in the model dtype, as in vLLM. The tensor names
and shapes an fp8 checkpoint may hold are in common/config/checkpoint_quantization.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from common.config.checkpoint_quantization import Fp8Scheme
from common.models.fp8_weights import FP8, Fp8Weight
from common.models.moe import SparseMoeBlock
from common.models.weights_safetensors import safetensors_files


def quantize_linears(model) -> None:
    """Replace every linear layer's dense weight (already loaded) by its fp8 form, one scale
    per output channel, and every mixture-of-experts layer's experts, one scale per expert's
    output channel (SparseMoeBlock.quantize_fp8); the dense weights are freed layer by layer."""
    for _role, module, _names in model.linear_sources():
        if module is not None:
            module.keep_packed(Fp8Weight.quantize(module.weight))
    for module in model.modules():
        if isinstance(module, SparseMoeBlock):
            module.quantize_fp8()


def load_fp8_linears(model, folder: Path, scheme: Fp8Scheme, keep: bool) -> tuple[set[str], set[str]]:
    """Read the fp8 weights and scales of every linear layer of `model` from the checkpoint in
    `folder`: kept in fp8 (`keep`) or dequantized into the dense weight (--quantization none).
    A layer stored in another dtype is left to the dense loader; an fp8 LM head is dequantized
    into the model dtype. Returns (the weights loaded, every tensor read: weights and scales)."""
    loaded: set[str] = set()
    read: set[str] = set()
    with contextlib.ExitStack() as stack:
        files = [
            stack.enter_context(safe_open(str(f), framework="pt", device="cpu"))
            for f in safetensors_files(folder)
        ]
        where = {name: f for f in files for name in f.keys()}
        for _role, module, names in model.linear_sources():
            if any(name not in where for name in names):
                continue  # the dense loader names what is missing
            fp8 = [where[name].get_slice(name).get_dtype() == "F8_E4M3" for name in names]
            if not any(fp8):
                continue
            if not all(fp8):
                raise ValueError(f"{', '.join(names)} are fused into one layer but only some are fp8")
            dense = model.lm_head if module is None else module.weight
            parts = [_read_part(where, name, scheme, read, dense.device) for name in names]
            weight = Fp8Weight.fuse_rows(parts, dense.dtype, prepare=keep and module is not None)
            if (weight.out_features, weight.in_features) != tuple(dense.shape):
                raise ValueError(
                    f"{', '.join(names)} hold {weight.out_features}x{weight.in_features} weights, the "
                    f"config needs {tuple(dense.shape)}; config.json and the weights do not belong together"
                )
            if module is not None and keep:
                module.keep_packed(weight)
            else:  # the LM head stays in the model dtype, as every layer with --quantization none
                with torch.no_grad():
                    dense.copy_(weight.dequantize(dense.dtype))
            loaded.update(names)
            read.update(names)
    return loaded, read


def _read_part(where, name: str, scheme: Fp8Scheme, read: set[str], device: torch.device) -> Fp8Weight:
    """One stored fp8 tensor `P.weight` with its scales, as an Fp8Weight (not yet prepared)."""
    base = name.removesuffix("weight")
    weight = where[name].get_tensor(name)
    n = weight.shape[0]
    scale_name = next((base + s for s in scheme.scale_names if base + s in where), None)
    if scale_name is None:
        raise ValueError(
            f"{name} is fp8 but the checkpoint has no {' or '.join(base + s for s in scheme.scale_names)}; "
            f"config.json's {scheme.method} quantization_config needs it: the checkpoint is incomplete"
        )
    scale = where[scale_name].get_tensor(scale_name).float()
    read.add(scale_name)
    if scheme.block is None:
        if scale.numel() == 1:  # per tensor: held as the same scale for every row
            scale = scale.reshape(()).expand(n)
        elif tuple(scale.shape) in ((n,), (n, 1)):
            scale = scale.reshape(n)
        else:
            raise ValueError(
                f"{scale_name} has shape {tuple(scale.shape)}; a per-tensor scale has one value and a "
                f"per-channel one [{n}] or [{n}, 1]"
            )
    input_scale = None
    if scheme.static_activations:
        input_name = next((base + s for s in scheme.input_scale_names if base + s in where), None)
        if input_name is None:
            raise ValueError(
                f"{name} has static activation scales in config.json but the checkpoint has no "
                f"{base}input_scale; the checkpoint is incomplete"
            )
        input_scale = where[input_name].get_tensor(input_name).float()
        if input_scale.numel() != 1:
            raise ValueError(f"{input_name} has shape {tuple(input_scale.shape)}; pdserve takes one value")
        read.add(input_name)
        input_scale = input_scale.to(device)
    return Fp8Weight(weight.to(device), scale.to(device), scheme.block, input_scale, prepare=False)


def dense_weights(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's other tensors, refusing any fp8 one: only linear layers are served in fp8."""
    for name, tensor in weights:
        if tensor.dtype == FP8:
            raise ValueError(
                f"{name} is stored in fp8, which pdserve serves for linear layers' weights only "
                "(not embeddings or a tied LM head); dequantize it in the checkpoint"
            )
        yield name, tensor
