"""Weights of a GGUF file, dequantized to float32 and renamed to Hugging Face names.

llama.cpp's converter permutes the rows of attn_q / attn_k of llama-architecture models
(to interleave the rotary pairs); this module undoes that, giving the Hugging Face
weights exactly. qwen2/qwen3 files are stored unpermuted.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize

from common.models.config import ModelConfig
from common.models.weights_shard import Shard

_PERMUTED_ARCHITECTURES = ("llama", "mistral")
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Folded into ModelConfig.rope_scaling, not a weight.
_CONFIG_TENSORS = ("rope_freqs.weight",)


def hf_name(gguf_name: str) -> str:
    """The Hugging Face name of a GGUF tensor; an unknown name is returned unchanged."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_TENSOR.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return gguf_name


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's per-head interleaving of the rotary halves in a q/k projection."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def iter_gguf_weights(
    reader: GGUFReader, config: ModelConfig, shards: Mapping[str, Shard] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, float32 CPU tensor) for every weight of the file; a tensor named
    in `shards` comes as that slice only (a tensor-parallel rank's part).

    A row slice is cut from the stored (quantized) rows before dequantizing, so a rank
    dequantizes only its rows; quantization blocks run along a row, and the q/k
    permutation stays inside a head, so whole heads slice cleanly.
    """
    permuted = config.extra.get("gguf_architecture") in _PERMUTED_ARCHITECTURES
    shards = shards or {}
    for tensor in reader.tensors:
        if tensor.name in _CONFIG_TENSORS:
            continue
        name = hf_name(tensor.name)
        shard = shards.get(name)
        data = tensor.data
        if shard is not None and shard.dim == 0:
            data = data[shard.start : shard.stop]
        w = dequantize(data, tensor.tensor_type)
        if permuted and name.endswith(("q_proj.weight", "k_proj.weight")):
            w = unpermute_rows(w, w.shape[0] // config.head_dim)
        if shard is not None and shard.dim == 1:
            w = w[:, shard.start : shard.stop]
        # np.array copies: the reader's arrays are read-only views of the mapped file.
        yield name, torch.from_numpy(np.array(w, dtype=np.float32))
